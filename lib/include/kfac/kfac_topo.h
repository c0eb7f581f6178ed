/* kfac_topo.h - where this process runs: rank, node, local rank, GPU,
 * cores, and the communicators built from that once per job.
 *
 * Discovery order:
 *   1. PMIx (srun --mpi=pmix, or Open MPI's mpirun, which is a PMIx
 *      server): PMIX_RANK, PMIX_JOB_SIZE, PMIX_LOCAL_RANK, PMIX_LOCAL_SIZE,
 *      PMIX_NODEID, PMIX_HOSTNAME, PMIX_NUM_NODES.
 *   2. MPI: MPI_Comm_split_type(MPI_COMM_TYPE_SHARED) for the node's ranks
 *      and gethostname, with SLURM_NODEID / SLURM_NNODES when present.
 *   3. A single process (no launcher): rank 0 of 1.
 * `source` says which one answered.  PMIx is used only when it answers on
 * every rank; setting KFAC_TOPO_NO_PMIX=1 skips it (to test the fallback).
 * In the MPI fallback the ranks of a node are those of one SLURM_NODEID
 * (when every rank has one and no Slurm node spans two shared-memory
 * domains), else those of one shared-memory domain; local ranks follow rank
 * order; host is SLURMD_NODENAME when set, else gethostname().  Node ids are
 * 0..num_nodes-1 in rank order of each node's first rank; num_nodes counts
 * nodes that run at least one rank.
 *
 * GPU: from CUDA_VISIBLE_DEVICES as Slurm sets it.  One entry (srun
 * --gpus-per-task=1): that GPU.  As many entries as local ranks or more
 * (--gpus-per-node): entry local_rank.  Unset or empty: no GPU (-1).  Fewer
 * entries than local ranks: GPUs are shared round-robin and `gpu_shared`
 * is set; it is also set when another rank of the node uses the same entry
 * (e.g. --gpus-per-node=1 with two tasks per node).  `gpu` is the physical
 * index as listed (what Slurm allocated), or the position for entries that
 * are not integers (GPU-/MIG- UUIDs); `device` is the index the CUDA
 * runtime sees (position in the list).  "-1" or "NoDevFiles": no GPU.
 *
 * Cores: the process's CPU binding (hwloc when built with it, else
 * sched_getaffinity), as a list string like "0-3,8"; numa: the NUMA nodes
 * the binding touches.  NIC: the network device hwloc places nearest the
 * binding, InfiniBand/RoCE HCAs before Ethernet; with several equally near,
 * local ranks take them in turn.  It is reported (the map, NCCL_IB_HCA or
 * UCX_NET_DEVICES can use it), not enforced.
 */
#ifndef KFAC_TOPO_H
#define KFAC_TOPO_H

#include "kfac/kfac_comm.h"
#include "kfac/kfac_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kfac_topo_source {
    KFAC_TOPO_SINGLE = 0, /* no launcher */
    KFAC_TOPO_PMIX,
    KFAC_TOPO_MPI         /* MPI_Comm_split_type + SLURM_* fallback */
} kfac_topo_source;
const char *kfac_topo_source_name(kfac_topo_source s); /* "single", "pmix", "mpi" */

#define KFAC_TOPO_HOST 64
#define KFAC_TOPO_LIST 128

typedef struct kfac_rank_info {
    int rank, size;
    int local_rank, local_size;
    int node, num_nodes;
    char host[KFAC_TOPO_HOST];
    int gpu;        /* physical GPU index from CUDA_VISIBLE_DEVICES, -1: none */
    int device;     /* CUDA runtime index (position in the list), -1: none */
    int gpu_shared; /* more local ranks than visible GPUs */
    char cores[KFAC_TOPO_LIST]; /* CPU binding, e.g. "0-3" */
    char numa[KFAC_TOPO_LIST];  /* NUMA nodes of the binding, e.g. "0" ("" unknown) */
    char nic[KFAC_TOPO_HOST];   /* nearest network device, e.g. "mlx5_0" ("" unknown) */
} kfac_rank_info;

typedef struct kfac_topo kfac_topo;

/* Initialises MPI when a launcher started this process (PMIX_RANK,
 * OMPI_COMM_WORLD_RANK or PMI_RANK in the environment) or when
 * force_mpi is set; otherwise the topology is a single process and no MPI
 * call is made.  MPI already initialised by the caller is used as it is;
 * otherwise it is started with MPI_THREAD_FUNNELED (only the main thread
 * calls MPI).  Gathers every rank's kfac_rank_info, builds the world,
 * intra-node and inter-node (same local rank, one per node) communicators.
 * Collective over all ranks: a failure on one rank (KFAC_ECOMM for MPI and
 * PMIx failures, naming the call) makes every rank fail, the others with a
 * message naming the rank that failed. */
kfac_status kfac_topo_init(kfac_topo **out, int force_mpi);
/* Frees the communicators and finalizes PMIx, and MPI if kfac_topo_init
 * started it.  Call it before the caller's own MPI_Finalize. */
void kfac_topo_free(kfac_topo *t);

kfac_topo_source kfac_topo_source_used(const kfac_topo *t);
const kfac_rank_info *kfac_topo_self(const kfac_topo *t);
/* Every rank's info, indexed by rank (the same on all ranks). */
const kfac_rank_info *kfac_topo_rank(const kfac_topo *t, int rank);
/* node_of_rank[rank], size entries. */
const int *kfac_topo_node_of_rank(const kfac_topo *t);

/* The communicators (owned by the topology; self comms in a single process). */
kfac_comm *kfac_topo_world(kfac_topo *t);
kfac_comm *kfac_topo_intra(kfac_topo *t); /* ranks of this node */
kfac_comm *kfac_topo_inter(kfac_topo *t); /* this local rank on every node */

/* Writes the node map: one line per node,
 *   "node 0 node1: ranks 0-1 gpus 0,1 cores 0-1|2-3 nics mlx5_0|mlx5_1"
 * (host of the node's first rank; ranks as a range list; gpus per local
 * rank, "-" for none; cores and nics per local rank separated by '|', "-"
 * when unknown; each line ends in '\n').  Returns the number of characters
 * needed, as snprintf does (-1 when out of memory). */
int kfac_topo_format_map(const kfac_topo *t, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
