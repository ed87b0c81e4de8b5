/*
 * registry.h: the model repository: DIR/<name>/config.json with versions in DIR/<name>/<n>/.
 *
 * Each loaded model is a refcounted snapshot (struct model). A request takes a reference with
 * registry_acquire() and drops it with model_release() when its response is queued; a reload
 * builds the new snapshot first, then swaps the pointer, so in-flight requests finish on the
 * version they started on and nothing is dropped. The last release destroys the snapshot.
 */
#ifndef INFERD_REGISTRY_H
#define INFERD_REGISTRY_H

#include "core/buf.h"
#include "core/err.h"
#include "inferd/backend.h"
#include "model/batcher.h"
#include "kserve/features.h"

#include <stdatomic.h>
#include <stdint.h>

struct model {
    char *name;
    int64_t version;
    char version_str[24];
    const struct inferd_backend_api *api;
    void *model_state;
    struct inferd_model_info info; /* the backend's memory, valid while the model lives */
    struct features features;      /* info's feature names, by name; n 0 when it has none */
    struct batcher *batcher;
    int64_t default_timeout_us;    /* 0 means none */
    int64_t job_lease_timeout_ms;  /* async jobs' visibility timeout */
    char *callback_url;            /* async jobs' default webhook; NULL means none */
    struct metrics_model *metrics; /* lives for the whole process */
    struct metrics_version *stats; /* this version's statistics; lives for the whole process */
    _Atomic int refs;
};

struct registry;

/* `dir` is borrowed (copied). Nothing is loaded yet. */
int registry_create(const char *dir, struct registry **out, struct err *e);

/* Runs every model loaded from now on with `n` instances, whatever config.json says (0: as
 * configured). `inferd batch` uses it: no HTTP threads compete for the CPUs there. */
void registry_set_instances(struct registry *r, int n);

/* Loads (or reloads) every model folder under the repository; a model that fails is logged
 * with its path and reason and left unavailable, the others load. Models whose folder is gone
 * are unloaded. Returns the number that failed. */
int registry_load_all(struct registry *r);

/* Loads or reloads one model from disk. ERR_NOT_FOUND if no such folder, ERR_INVALID with the
 * reason if it does not load (the running version, if any, keeps serving). */
int registry_load(struct registry *r, const char *name, struct err *e);

/* Stops serving `name`; in-flight requests finish. ERR_NOT_FOUND if it is not loaded. */
int registry_unload(struct registry *r, const char *name, struct err *e);

/*
 * A reference to the loaded model `name`; `version` 0 means the served one, otherwise it must
 * match. Release it with model_release(). ERR_NOT_FOUND names the model or version.
 */
int registry_acquire(struct registry *r, const char *name, int64_t version, struct model **out,
                     struct err *e);
void model_release(struct model *m);

/* Appends the repository index as a JSON array: name, version, state, reason. */
int registry_index(struct registry *r, struct buf *out);

/* Unloads everything (waiting for in-flight requests) and frees. NULL does nothing. */
void registry_destroy(struct registry *r);

#endif
