/*
 * backend.c: the table of loaded backends (built-in and plugins), each initialised once.
 *
 * The host table a backend receives in init comes from the caller (model/batcher.c builds
 * it), so backends, built-in or not, know nothing of the model runtime above them.
 */
#include "backend/backend.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct loaded {
    char *key; /* "xgboost" or the plugin's path */
    const struct inferd_backend_api *api;
    void *state;
    struct loaded *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct loaded *loaded; /* guarded by lock; never shrinks */

static int load_plugin(const char *path, const struct inferd_backend_api **api, struct err *e)
{
    inferd_backend_get_fn get;
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);

    if (!handle)
        return err_set(e, ERR_NOT_FOUND, "plugin %s: %s", path, dlerror());
    *(void **)&get = dlsym(handle, "inferd_backend_get");
    if (!get) {
        dlclose(handle);
        return err_set(e, ERR_INVALID, "plugin %s: no symbol inferd_backend_get", path);
    }
    *api = get();
    if (!*api || (*api)->api_version < INFERD_BACKEND_API_VERSION_MIN ||
        (*api)->api_version > INFERD_BACKEND_API_VERSION) {
        unsigned v = *api ? (*api)->api_version : 0;
        dlclose(handle);
        return err_set(e, ERR_INVALID, "plugin %s: built for backend API %u, inferd speaks %d to %d",
                       path, v, INFERD_BACKEND_API_VERSION_MIN, INFERD_BACKEND_API_VERSION);
    }
    if (!(*api)->model_create ||
        (!(*api)->execute && ((*api)->api_version < 2 || !(*api)->execute_async))) {
        dlclose(handle);
        return err_set(e, ERR_INVALID, "plugin %s: model_create and execute are required", path);
    }
    return 0;
}

int backend_open(const char *name, const char *plugin_path, const struct inferd_host *host,
                 const struct inferd_backend_api **api, void **backend_state, struct err *e)
{
    const char *key;
    const struct inferd_backend_api *found = NULL;
    struct loaded *l;
    char errbuf[256] = "";
    int rc = 0;

    if (strcmp(name, "xgboost") == 0 || strcmp(name, "http") == 0) {
        key = name;
    } else if (strcmp(name, "plugin") == 0) {
        if (!plugin_path)
            return err_set(e, ERR_INVALID, "backend 'plugin' needs \"path\" in config.json");
        key = plugin_path;
    } else {
        return err_set(e, ERR_NOT_FOUND, "unknown backend '%s' (xgboost, http or plugin)", name);
    }
    pthread_mutex_lock(&lock);
    for (l = loaded; l; l = l->next)
        if (strcmp(l->key, key) == 0)
            break;
    if (!l) {
        if (strcmp(name, "xgboost") == 0)
            found = backend_xgboost();
        else if (strcmp(name, "http") == 0)
            found = backend_http();
        else
            rc = load_plugin(plugin_path, &found, e);
        l = rc == 0 ? calloc(1, sizeof(*l)) : NULL;
        if (rc == 0 && (!l || !(l->key = strdup(key)))) {
            free(l);
            l = NULL;
            rc = err_set(e, ERR_NOMEM, "out of memory");
        }
        if (rc == 0 && found->init && found->init(host, &l->state, errbuf, sizeof(errbuf))) {
            rc = err_set(e, ERR_BACKEND, "backend '%s' failed to start: %s", key, errbuf);
            free(l->key);
            free(l);
            l = NULL;
        }
        if (rc == 0) {
            l->api = found;
            l->next = loaded;
            loaded = l;
        }
    }
    if (rc == 0) {
        *api = l->api;
        *backend_state = l->state;
    }
    pthread_mutex_unlock(&lock);
    return rc;
}
