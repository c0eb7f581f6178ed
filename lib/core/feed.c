/* feed.c - the trainer's input pipeline (feed.h). */
#include <stdlib.h>
#include <string.h>

#include "core/feed.h"

struct kfac_feed {
    kfac_model *model;
    kfac_backend *be;
    kfac_loader *loader;
    float *input[2];        /* [0] the model's own, [1] allocated here */
    int32_t *labels[2];     /* host copies: the loader recycles its slot */
    int next;               /* the buffer pair the staged piece goes to */
    int has_staged;
    kfac_loader_piece staged;
    size_t image_bytes;
    int max_images;
};

kfac_status kfac__feed_init(kfac_feed **out, kfac_model *m, kfac_loader *loader, int piece)
{
    *out = NULL;
    if (piece < 1 || piece > kfac_model_max_batch(m))
        return KFAC_ERR(KFAC_EINVAL, "feed: pieces of %d images, the model takes 1 to %d", piece,
                        kfac_model_max_batch(m));
    kfac_feed *f = calloc(1, sizeof *f);
    if (!f) return KFAC_ERR(KFAC_ENOMEM, "feed: out of memory");
    int h, w, c;
    kfac_model_input_shape(m, &h, &w, &c);
    f->model = m;
    f->be = kfac_model_backend(m);
    f->loader = loader;
    f->max_images = piece;
    f->image_bytes = (size_t)h * w * c * sizeof(float);
    f->input[0] = kfac_model_own_input(m);
    f->labels[0] = malloc((size_t)f->max_images * sizeof(int32_t));
    f->labels[1] = malloc((size_t)f->max_images * sizeof(int32_t));
    kfac_status st = f->labels[0] && f->labels[1]
                         ? KFAC_OK
                         : KFAC_ERR(KFAC_ENOMEM, "feed: out of memory");
    if (st == KFAC_OK)
        st = f->be->alloc(f->be, (size_t)f->max_images * f->image_bytes, (void **)&f->input[1]);
    if (st != KFAC_OK) {
        kfac__feed_free(f);
        return st;
    }
    *out = f;
    return KFAC_OK;
}

void kfac__feed_free(kfac_feed *f)
{
    if (!f) return;
    if (f->input[1]) {
        kfac__feed_stop(f); /* no copy may land in a released buffer */
        f->be->release(f->be, f->input[1]);
    }
    free(f->labels[0]);
    free(f->labels[1]);
    free(f);
}

kfac_status kfac__feed_start(kfac_feed *f, kfac_loader_cursor cursor)
{
    f->has_staged = 0;
    KFAC_TRY(f->be->upload_wait(f->be)); /* restarting recycles the loader's buffers */
    return kfac_loader_start(f->loader, cursor);
}

kfac_status kfac__feed_stop(kfac_feed *f)
{
    f->has_staged = 0;
    kfac_model_bind_input(f->model, f->input[0]);
    return f->be->upload_wait(f->be);
}

/* Takes the next piece from the loader and queues its upload into
 * buffer pair `next`. */
static kfac_status stage(kfac_feed *f)
{
    kfac_loader_piece p;
    /* The copy of the piece before has read its loader slot, which the
     * next take recycles (it was queued a whole step ago: no real wait). */
    KFAC_TRY(f->be->upload_wait(f->be));
    KFAC_TRY(kfac_loader_next(f->loader, &p));
    if (p.n < 0 || p.n > f->max_images)
        return KFAC_ERR(KFAC_EINVAL, "feed: a piece of %d images, the feed takes %d", p.n,
                        f->max_images);
    if (p.n > 0) { /* 0: the epoch is over, and the piece has no arrays */
        memcpy(f->labels[f->next], p.labels, (size_t)p.n * sizeof(int32_t));
        KFAC_TRY(f->be->upload_async(f->be, f->input[f->next], p.images,
                                     (size_t)p.n * f->image_bytes));
    }
    f->staged = p;
    f->staged.images = NULL;
    f->staged.labels = f->labels[f->next];
    f->has_staged = 1;
    return KFAC_OK;
}

kfac_status kfac__feed_take(kfac_feed *f, int last, kfac_loader_piece *piece)
{
    if (!f->has_staged) KFAC_TRY(stage(f));
    *piece = f->staged;
    f->has_staged = 0;
    if (piece->n == 0) return KFAC_OK;
    KFAC_TRY(f->be->upload_join(f->be));
    kfac_model_bind_input(f->model, f->input[f->next]);
    f->next ^= 1;
    /* Into the buffer the previous step read: upload_async starts the copy
     * after that step's queued work. */
    return last ? KFAC_OK : stage(f);
}
