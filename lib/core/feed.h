/* feed.h - internal: the trainer's input pipeline.  Pieces come from a
 * kfac_loader (read ahead on its thread into host buffers the backend
 * uploads fastest from) and reach the model through two backend input
 * buffers: while a step computes on one, the next piece uploads into the
 * other (the backend's upload_async), so on a GPU the copy hides behind
 * the step before it.
 *
 * The loader is one piece further along than the model: a checkpoint that
 * records kfac_loader_position must subtract the staged piece. */
#ifndef KFAC_FEED_H
#define KFAC_FEED_H

#include "kfac/kfac_loader.h"
#include "kfac/kfac_model.h"

typedef struct kfac_feed kfac_feed;

/* A feed of the loader's pieces of up to `piece` images into model m
 * (its own input buffer and one more of `piece` images). */
kfac_status kfac__feed_init(kfac_feed **out, kfac_model *m, kfac_loader *loader, int piece);

/* Drops any staged piece, waits for copies in flight, and starts the
 * loader at `cursor`. */
kfac_status kfac__feed_start(kfac_feed *f, kfac_loader_cursor cursor);

/* Waits for copies in flight and gives the model back its own input
 * buffer (before other users of the model's input: evaluation). */
kfac_status kfac__feed_stop(kfac_feed *f);

/* Binds the next piece to the model's input and describes it in *piece
 * (images NULL: they are in the model; labels owned by the feed, valid
 * until the next call).  Unless `last`, then queues the upload of the
 * piece after it.  piece->n is 0 once the epoch is over. */
kfac_status kfac__feed_take(kfac_feed *f, int last, kfac_loader_piece *piece);

void kfac__feed_free(kfac_feed *f);

#endif
