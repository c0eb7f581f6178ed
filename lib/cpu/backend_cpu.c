/* backend_cpu.c - the CPU backend table: host memory and the operations of
 * lib/cpu, with the thread count fixed at creation. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/cpu.h"

static kfac_status cpu_alloc(kfac_backend *be, size_t bytes, void **ptr)
{
    /* 64-byte alignment for AVX-512 loads and whole cache lines. */
    *ptr = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!*ptr) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate %zu bytes of host memory", bytes);
    return KFAC_OK;
}

static void cpu_release(kfac_backend *be, void *ptr) { free(ptr); }

static kfac_status cpu_copy(kfac_backend *be, void *dst, const void *src, size_t bytes)
{
    memcpy(dst, src, bytes);
    return KFAC_OK;
}

/* Nothing is ever in flight: upload_async copied at once. */
static kfac_status cpu_nothing_queued(kfac_backend *be)
{
    (void)be;
    return KFAC_OK;
}

static void cpu_destroy(kfac_backend *be)
{
    free(kfac__cpu(be)->reduce_scratch);
    free(be->impl);
    free(be);
}

kfac_status kfac_backend_cpu_init(int threads, kfac_backend **out)
{
    *out = NULL;
    if (threads < 0) return KFAC_ERR(KFAC_EINVAL, "threads must be >= 0, got %d", threads);
    if (threads == 0) threads = omp_get_num_procs();
    kfac_backend *be = calloc(1, sizeof *be);
    kfac_cpu *cpu = calloc(1, sizeof *cpu);
    double *scratch = calloc((size_t)threads * 2 * KFAC_CPU_MAX_CH, sizeof(double));
    if (!be || !cpu || !scratch) {
        free(be);
        free(cpu);
        free(scratch);
        return KFAC_ERR(KFAC_ENOMEM, "cannot allocate the CPU backend");
    }
    cpu->reduce_scratch = scratch;
    be->name = "cpu";
    be->threads = threads;
    be->cache_chunks = 1;
    /* OpenBLAS (OpenMP build) sizes its own teams from this when called
     * outside our parallel regions: keep it to the backend's threads, or
     * ranks sharing a node oversubscribe it. */
    omp_set_num_threads(threads);
    be->impl = cpu;
    be->alloc = cpu_alloc;
    be->release = cpu_release;
    be->upload = cpu_copy;
    be->download = cpu_copy;
    be->upload_async = cpu_copy;
    be->upload_join = cpu_nothing_queued;
    be->upload_wait = cpu_nothing_queued;
    be->fill = kfac__cpu_fill;
    be->conv_workspace = kfac__cpu_conv_workspace;
    be->conv_forward = kfac__cpu_conv_forward;
    be->conv_backward = kfac__cpu_conv_backward;
    be->bn_forward_train = kfac__cpu_bn_forward_train;
    be->bn_forward_eval = kfac__cpu_bn_forward_eval;
    be->bn_backward = kfac__cpu_bn_backward;
    be->relu_forward = kfac__cpu_relu_forward;
    be->relu_backward = kfac__cpu_relu_backward;
    be->add_forward = kfac__cpu_add_forward;
    be->add_backward = kfac__cpu_add_backward;
    be->maxpool_forward = kfac__cpu_maxpool_forward;
    be->maxpool_backward = kfac__cpu_maxpool_backward;
    be->gap_forward = kfac__cpu_gap_forward;
    be->gap_backward = kfac__cpu_gap_backward;
    be->softmax_xent = kfac__cpu_softmax_xent;
    be->xent_result = kfac__cpu_xent_result;
    be->sgd_update = kfac__cpu_sgd_update;
    be->scale_grads = kfac__cpu_scale_grads;
    kfac__cpu_set_kfac_ops(be);
    be->destroy = cpu_destroy;
    *out = be;
    return KFAC_OK;
}
