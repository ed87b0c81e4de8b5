/*
 * iopool.c: a few threads that run the blocking calls (the job store, files) that HTTP
 * threads must never wait on. Tasks run in submission order; a task never blocks for long,
 * because the queue's group commit answers within one fsync.
 */
#include "http/http_internal.h"

#include <pthread.h>
#include <stdlib.h>

struct task {
    void (*fn)(void *arg);
    void *arg;
    struct task *next;
};

struct iopool {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    struct task *head, *tail; /* guarded by lock */
    int stopping;             /* guarded by lock */
    pthread_t *threads;
    int n_threads;
};

static void *io_main(void *arg)
{
    struct iopool *p = arg;

    pthread_mutex_lock(&p->lock);
    for (;;) {
        struct task *t;
        while (!p->head && !p->stopping)
            pthread_cond_wait(&p->cond, &p->lock);
        if (!p->head)
            break;
        t = p->head;
        p->head = t->next;
        if (!p->head)
            p->tail = NULL;
        pthread_mutex_unlock(&p->lock);
        t->fn(t->arg);
        free(t);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

int iopool_create(int threads, struct iopool **out)
{
    struct iopool *p = calloc(1, sizeof(*p));

    *out = NULL;
    if (!p || !(p->threads = calloc((size_t)threads, sizeof(pthread_t)))) {
        free(p);
        return -1;
    }
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->cond, NULL);
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&p->threads[i], NULL, io_main, p) != 0)
            break;
        p->n_threads++;
    }
    if (p->n_threads == 0) {
        iopool_destroy(p);
        return -1;
    }
    *out = p;
    return 0;
}

void iopool_run(struct iopool *p, void (*fn)(void *arg), void *arg)
{
    struct task *t = malloc(sizeof(*t));

    if (!t) {
        fn(arg); /* out of memory: run it here rather than lose the request */
        return;
    }
    t->fn = fn;
    t->arg = arg;
    t->next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->tail)
        p->tail->next = t;
    else
        p->head = t;
    p->tail = t;
    pthread_cond_signal(&p->cond);
    pthread_mutex_unlock(&p->lock);
}

void iopool_destroy(struct iopool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    pthread_cond_broadcast(&p->cond);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->lock);
    pthread_cond_destroy(&p->cond);
    free(p->threads);
    free(p);
}
