/*
 * backend.h: finds the backend a model's config names: a built-in one (xgboost) or a plugin
 * shared object (backend "plugin", loaded with dlopen from the config's "path").
 *
 * Each backend is initialised once per process, on first use, and stays loaded until exit:
 * unloading a plugin's code while a reloaded model might still call it is not worth the risk.
 */
#ifndef INFERD_BACKEND_INTERNAL_H
#define INFERD_BACKEND_INTERNAL_H

#include "core/err.h"
#include "inferd/backend.h"

/*
 * Resolves `name` ("xgboost", "http" or "plugin"; for "plugin", `plugin_path` is the .so to load).
 *   host                 borrowed until process exit; given to the backend's init on first use
 *                        (one table per process: later calls' `host` is not looked at)
 *   api, backend_state  lent until process exit
 * Returns 0, ERR_NOT_FOUND (unknown backend or no such file) or ERR_INVALID (wrong ABI).
 * Thread-safe.
 */
int backend_open(const char *name, const char *plugin_path, const struct inferd_host *host,
                 const struct inferd_backend_api **api, void **backend_state, struct err *e);

/* Built-ins. */
const struct inferd_backend_api *backend_xgboost(void);
const struct inferd_backend_api *backend_http(void); /* http.c: an upstream model server */

#endif
