/* loader.c - a bounded ring of piece buffers filled by one loader thread.
 *
 * The thread is started by kfac_loader_start and joined by the next start
 * (or free), so an epoch change never races with a read in flight: the
 * batcher's permutation is switched only while no thread uses it.  Pieces
 * are produced strictly in order into slots (head + filled) % slots and
 * consumed from head; the piece handed out last stays owned by the caller
 * until its next call, so the ring has depth + 1 slots: depth pieces ahead
 * of the one being trained on.
 */
#include "kfac/kfac_loader.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/clock.h"

typedef struct slot {
    float *images;
    int32_t *labels;
    int n;
    size_t batch;
    int index;
    kfac_status status; /* a failed read: the loader stops after this slot */
    char message[512];
} slot;

struct kfac_loader {
    kfac_batcher *batcher;
    kfac_loader_config cfg;
    int pieces_per_batch;
    int num_slots; /* depth + 1, or 1 when reading on the caller's thread */
    slot *slots;
    int epoch;

    pthread_mutex_t lock;
    pthread_cond_t ready; /* a slot was filled or the loader finished */
    pthread_cond_t space; /* a slot was released or stop was asked */
    pthread_t thread;
    int running;          /* thread started and not yet joined */
    int stop;             /* asks the thread to return */
    int done;             /* nothing more will be produced this run */
    int head, filled;     /* ring state, under lock */
    int holding;          /* the caller holds slots[head] */

    size_t next_batch;    /* next piece to produce (loader thread, or caller at depth 0) */
    int next_index;
    size_t given_batch;   /* the last piece handed out */
    int given_index;
    int given_any;
    kfac_loader_cursor started;
    int failed;
    double wait_seconds;
};

static void *default_alloc(size_t bytes, void *user)
{
    (void)user;
    return malloc(bytes);
}

static void default_release(void *ptr, void *user)
{
    (void)user;
    free(ptr);
}

/* Reads the piece at the production position into s and advances it.
 * Returns 0 once the epoch has no pieces left. */
static int produce(kfac_loader *l, slot *s)
{
    size_t batches = kfac_batcher_batches_per_epoch(l->batcher);
    for (;;) {
        if (l->next_batch >= batches) return 0;
        s->batch = l->next_batch;
        s->index = l->next_index;
        if (++l->next_index == l->pieces_per_batch) l->next_index = 0, l->next_batch++;
        int offset = l->cfg.first + s->index * l->cfg.piece;
        s->status = kfac_batcher_read(l->batcher, s->batch, offset, l->cfg.piece, s->images,
                                      s->labels, &s->n);
        if (s->status != KFAC_OK) {
            snprintf(s->message, sizeof s->message, "%s", kfac_last_error());
            return 1;
        }
        if (s->n > 0) return 1; /* a short last batch may leave this rank nothing */
    }
}

static void *loader_thread(void *arg)
{
    kfac_loader *l = arg;
    pthread_mutex_lock(&l->lock);
    for (;;) {
        /* The held slot counts as filled until the caller releases it. */
        while (l->filled == l->num_slots && !l->stop) pthread_cond_wait(&l->space, &l->lock);
        if (l->stop) break;
        slot *s = &l->slots[(l->head + l->filled) % l->num_slots];
        pthread_mutex_unlock(&l->lock);
        int produced = produce(l, s);
        pthread_mutex_lock(&l->lock);
        if (!produced) break;
        l->filled++;
        pthread_cond_signal(&l->ready);
        if (s->status != KFAC_OK) break;
    }
    l->done = 1;
    pthread_cond_signal(&l->ready);
    pthread_mutex_unlock(&l->lock);
    return NULL;
}

static void join_thread(kfac_loader *l)
{
    if (!l->running) return;
    pthread_mutex_lock(&l->lock);
    l->stop = 1;
    pthread_cond_signal(&l->space);
    pthread_mutex_unlock(&l->lock);
    pthread_join(l->thread, NULL);
    l->running = 0;
}

kfac_status kfac_loader_init(kfac_loader **out, kfac_batcher *batcher,
                             const kfac_loader_config *cfg)
{
    *out = NULL;
    int batch_size = kfac_batcher_batch_size(batcher);
    if (cfg->piece < 1 || cfg->count < cfg->piece || cfg->count % cfg->piece != 0)
        return KFAC_ERR(KFAC_EINVAL, "loader: %d images per rank is not a multiple of pieces of %d",
                        cfg->count, cfg->piece);
    if (cfg->first < 0 || cfg->first > batch_size - cfg->count)
        return KFAC_ERR(KFAC_EINVAL, "loader: images %d..%d lie outside a batch of %d",
                        cfg->first, cfg->first + cfg->count - 1, batch_size);
    if (cfg->depth < 0) return KFAC_ERR(KFAC_EINVAL, "loader: depth %d < 0", cfg->depth);
    kfac_loader *l = calloc(1, sizeof *l);
    if (!l) return KFAC_ERR(KFAC_ENOMEM, "loader: out of memory");
    l->batcher = batcher;
    l->cfg = *cfg;
    if (!l->cfg.alloc || !l->cfg.release) {
        l->cfg.alloc = default_alloc;
        l->cfg.release = default_release;
    }
    l->pieces_per_batch = cfg->count / cfg->piece;
    l->num_slots = cfg->depth > 0 ? cfg->depth + 1 : 1;
    pthread_mutex_init(&l->lock, NULL);
    pthread_cond_init(&l->ready, NULL);
    pthread_cond_init(&l->space, NULL);
    *out = l;
    l->slots = calloc((size_t)l->num_slots, sizeof *l->slots);
    if (!l->slots) goto oom;
    size_t image_floats = kfac_batcher_image_floats(batcher);
    for (int i = 0; i < l->num_slots; i++) {
        slot *s = &l->slots[i];
        s->images = l->cfg.alloc((size_t)cfg->piece * image_floats * sizeof(float), l->cfg.alloc_user);
        s->labels = l->cfg.alloc((size_t)cfg->piece * sizeof(int32_t), l->cfg.alloc_user);
        if (!s->images || !s->labels) goto oom;
    }
    l->done = 1; /* nothing to hand out before kfac_loader_start */
    return KFAC_OK;
oom:
    kfac_loader_free(l);
    *out = NULL;
    return KFAC_ERR(KFAC_ENOMEM, "loader: cannot allocate %d buffers of %d images",
                    cfg->depth + 1, cfg->piece);
}

kfac_status kfac_loader_start(kfac_loader *l, kfac_loader_cursor cursor)
{
    join_thread(l);
    kfac_batcher_start_epoch(l->batcher, cursor.epoch);
    l->epoch = cursor.epoch;
    l->started = cursor;
    l->next_batch = cursor.batch;
    l->next_index = 0;
    l->given_any = 0;
    l->head = l->filled = l->holding = 0;
    l->stop = l->done = l->failed = 0;
    if (l->cfg.depth == 0) return KFAC_OK;
    if (pthread_create(&l->thread, NULL, loader_thread, l) != 0) {
        l->done = 1;
        return KFAC_ERR(KFAC_ENOMEM, "loader: cannot start the loader thread");
    }
    l->running = 1;
    return KFAC_OK;
}

static kfac_status hand_out(kfac_loader *l, const slot *s, kfac_loader_piece *piece)
{
    if (s->status != KFAC_OK) {
        l->failed = 1;
        return KFAC_ERR(s->status, "%s", s->message);
    }
    piece->images = s->images;
    piece->labels = s->labels;
    piece->n = s->n;
    piece->batch = s->batch;
    piece->index = s->index;
    l->given_batch = s->batch;
    l->given_index = s->index;
    l->given_any = 1;
    return KFAC_OK;
}

kfac_status kfac_loader_next(kfac_loader *l, kfac_loader_piece *piece)
{
    memset(piece, 0, sizeof *piece);
    if (l->failed) return KFAC_ERR(KFAC_EINVAL, "loader: a read failed; start it again");
    if (l->cfg.depth == 0) {
        if (l->done || !produce(l, &l->slots[0])) {
            l->done = 1;
            return KFAC_OK;
        }
        return hand_out(l, &l->slots[0], piece);
    }
    pthread_mutex_lock(&l->lock);
    if (l->holding) {
        l->head = (l->head + 1) % l->num_slots;
        l->filled--;
        l->holding = 0;
        pthread_cond_signal(&l->space);
    }
    if (l->filled == 0 && !l->done) {
        double t0 = kfac__now_seconds();
        while (l->filled == 0 && !l->done) pthread_cond_wait(&l->ready, &l->lock);
        l->wait_seconds += kfac__now_seconds() - t0;
    }
    if (l->filled == 0) {
        pthread_mutex_unlock(&l->lock);
        return KFAC_OK;
    }
    l->holding = 1;
    const slot *s = &l->slots[l->head];
    pthread_mutex_unlock(&l->lock);
    return hand_out(l, s, piece);
}

kfac_loader_cursor kfac_loader_position(const kfac_loader *l)
{
    if (!l->given_any) return l->started;
    kfac_loader_cursor c = {l->epoch, l->given_batch};
    if (l->given_index + 1 == l->pieces_per_batch) c.batch++;
    return c;
}

double kfac_loader_take_wait(kfac_loader *l)
{
    double w = l->wait_seconds;
    l->wait_seconds = 0;
    return w;
}

void kfac_loader_free(kfac_loader *l)
{
    if (!l) return;
    join_thread(l);
    if (l->slots)
        for (int i = 0; i < l->num_slots; i++) {
            if (l->slots[i].images) l->cfg.release(l->slots[i].images, l->cfg.alloc_user);
            if (l->slots[i].labels) l->cfg.release(l->slots[i].labels, l->cfg.alloc_user);
        }
    free(l->slots);
    pthread_mutex_destroy(&l->lock);
    pthread_cond_destroy(&l->ready);
    pthread_cond_destroy(&l->space);
    free(l);
}
