/* topo_internal.h - the pieces of kfac_topo shared between topo.c (the
 * lifecycle and the MPI side), topo_pmix.c (PMIx queries) and topo_local.c
 * (what a process can learn about itself: host, GPU, cores).
 *
 * The derivation steps work on a plain table of entries and make no MPI
 * call, so they can be tested on synthetic tables without a launcher.
 */
#ifndef KFAC_TOPO_INTERNAL_H
#define KFAC_TOPO_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kfac/kfac_topo.h"

/* What one rank sends to every other rank (twice: after discovery, then
 * with its GPU and cores).  `info` holds what the rank knows of itself;
 * the other fields only steer the derivation and are not exposed. */
typedef struct kfac__topo_entry {
    kfac_rank_info info;
    int launcher_node; /* PMIX_NODEID, or -1 */
    int slurm_node;    /* SLURM_NODEID, or -1 when unset or out of range */
    int shm_leader;    /* world rank of the first rank of its shared-memory domain, or -1 */
    uint64_t gpu_key; /* hash of the CUDA_VISIBLE_DEVICES entry it uses, 0: none */
} kfac__topo_entry;

/* Answers from PMIx for this process; -1 where not answered. */
typedef struct kfac__pmix_answer {
    int rank, size;
    int local_rank, local_size;
    int node, num_nodes;
    char host[KFAC_TOPO_HOST];
} kfac__pmix_answer;

/* ---- topo_pmix.c ---- */

/* PMIx_Init, the queries above, PMIx_Finalize: the answers are all we
 * need, and PMIx counts its inits, so Open MPI's own stays untouched.  On
 * failure (no server, a key not answered) the message says why; the caller
 * falls back to MPI. */
kfac_status kfac__topo_pmix_query(kfac__pmix_answer *out);

/* ---- topo_local.c ---- */

/* This node's name: SLURMD_NODENAME when set (Slurm's name for the node,
 * which is what PMIx reports under srun), else gethostname(). */
void kfac__topo_hostname(char host[KFAC_TOPO_HOST]);

/* GPU choice from a CUDA_VISIBLE_DEVICES value (NULL: unset) for
 * local_rank of local_size, following kfac_topo.h.  Sets info->gpu,
 * info->device, info->gpu_shared (the local part of it) and *key, a nonzero
 * hash of the entry in use (0 when no GPU). */
void kfac__topo_pick_gpu(const char *cvd, int local_rank, int local_size, kfac_rank_info *info,
                         uint64_t *key);

/* info->cores and info->numa from the process's CPU binding (hwloc, else
 * sched_getaffinity; numa "" when unknown), and info->nic, the network
 * device nearest it (hwloc; "" when none is known).  Needs local_rank. */
void kfac__topo_cpu_binding(kfac_rank_info *info);

/* Writes the sorted set of `n` non-negative ints as a range list ("0-3,8")
 * into buf; returns the length needed, as snprintf does. */
int kfac__topo_range_list(char *buf, size_t len, const int *sorted, int n);

/* ---- topo.c: derivation on a gathered table ---- */

/* Chooses node ids and local ranks for `size` entries (indexed by rank):
 * the launcher's node ids when every rank has one, else SLURM_NODEID when
 * every rank has one and no Slurm node spans two shared-memory domains,
 * else the shared-memory domains.  Node ids are renumbered 0..N-1 in order
 * of each node's first rank.  With use_launcher_local the launcher's local
 * ranks and sizes are kept and checked (KFAC_ECOMM when they are not
 * 0..n-1 on every node); otherwise local ranks are positions in rank order
 * within each node.  Sets info.node, info.num_nodes, info.local_rank and
 * info.local_size of every entry. */
kfac_status kfac__topo_assign_nodes(kfac__topo_entry *table, int size, int use_launcher_local);

/* Sets info.gpu_shared on every entry whose GPU another rank of the same
 * node also uses. */
void kfac__topo_mark_shared(kfac__topo_entry *table, int size);

#endif
