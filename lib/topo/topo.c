/* topo.c - kfac_topo: who this process is in the job (rank, node, local
 * rank, GPU, cores) and the world, intra-node and inter-node communicators
 * built from that.
 *
 * Under a launcher: MPI is initialised, each rank asks PMIx about itself
 * (topo_pmix.c) or, when PMIx does not answer on every rank, falls back to
 * MPI_Comm_split_type and SLURM_NODEID; the ranks all-gather what they
 * found, and every rank derives the same node numbering and local ranks
 * from the gathered table (kfac__topo_assign_nodes, which makes no MPI call
 * and is tested on synthetic tables).  A second all-gather shares each
 * rank's GPU and CPU binding, which depend on its local rank.  Failures on
 * one rank are agreed on by all (an MPI_Allreduce after each phase), so
 * every rank returns an error together instead of some waiting forever.
 */
#include "kfac/kfac_topo.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/strbuf.h"
#include "topo/topo_internal.h"

struct kfac_topo {
    kfac_topo_source source;
    int rank, size;
    kfac_rank_info *ranks; /* size entries, by rank */
    int *node_of_rank;     /* size entries */
    kfac_comm *world, *intra, *inter;
    int mpi_started;  /* kfac_topo_init called MPI_Init_thread */
};

const char *kfac_topo_source_name(kfac_topo_source s)
{
    switch (s) {
    case KFAC_TOPO_SINGLE: return "single";
    case KFAC_TOPO_PMIX: return "pmix";
    case KFAC_TOPO_MPI: return "mpi";
    }
    return "unknown";
}

/* ---- derivation on the gathered table (no MPI) ---- */

typedef struct topo_key {
    int key, rank;
} topo_key;

static int cmp_key(const void *a, const void *b)
{
    const topo_key *x = a, *y = b;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return (x->rank > y->rank) - (x->rank < y->rank);
}

enum { BASIS_LAUNCHER, BASIS_SLURM, BASIS_SHM };

static int basis_key(const kfac__topo_entry *e, int basis)
{
    return basis == BASIS_LAUNCHER ? e->launcher_node
           : basis == BASIS_SLURM  ? e->slurm_node
                                   : e->shm_leader;
}

static int all_have(const kfac__topo_entry *t, int size, int basis)
{
    for (int r = 0; r < size; r++)
        if (basis_key(&t[r], basis) < 0) return 0;
    return 1;
}

/* keys[] sorted by (key, rank): true when no Slurm node holds ranks of two
 * shared-memory domains (SLURM_NODEID inherited from a batch script by
 * processes on other hosts would). */
static int slurm_within_shm(const kfac__topo_entry *t, const topo_key *keys, int size)
{
    for (int i = 1; i < size; i++)
        if (keys[i].key == keys[i - 1].key &&
            t[keys[i].rank].shm_leader != t[keys[i - 1].rank].shm_leader)
            return 0;
    return 1;
}

static void sort_keys(const kfac__topo_entry *t, int size, int basis, topo_key *keys)
{
    for (int r = 0; r < size; r++) keys[r] = (topo_key){basis_key(&t[r], basis), r};
    qsort(keys, (size_t)size, sizeof *keys, cmp_key);
}

/* Checks the launcher's local ranks of one node's members (ranks
 * keys[lo..hi)): local_size equals the member count and the local ranks
 * are a permutation of 0..count-1.  seen has room for count flags. */
static kfac_status check_local(const kfac__topo_entry *t, const topo_key *keys, int lo, int hi,
                               unsigned char *seen)
{
    int count = hi - lo;
    memset(seen, 0, (size_t)count);
    for (int i = lo; i < hi; i++) {
        const kfac_rank_info *in = &t[keys[i].rank].info;
        if (in->local_size != count || in->local_rank < 0 || in->local_rank >= count ||
            seen[in->local_rank])
            return KFAC_ERR(KFAC_ECOMM,
                            "topo: the launcher's local ranks on the node of rank %d (%s, %d "
                            "ranks) are not 0..%d: rank %d has local rank %d of %d",
                            t[keys[lo].rank].info.rank, in->host, count, count - 1, in->rank,
                            in->local_rank, in->local_size);
        seen[in->local_rank] = 1;
    }
    return KFAC_OK;
}

kfac_status kfac__topo_assign_nodes(kfac__topo_entry *t, int size, int use_launcher_local)
{
    topo_key *keys = malloc((size_t)size * sizeof *keys);
    topo_key *firsts = malloc((size_t)size * sizeof *firsts);
    unsigned char *seen = malloc((size_t)size);
    kfac_status st = KFAC_OK;
    if (!keys || !firsts || !seen) {
        st = KFAC_ERR(KFAC_ENOMEM, "topo: out of memory for %d ranks", size);
        goto done;
    }
    int basis = BASIS_SHM;
    if (all_have(t, size, BASIS_LAUNCHER)) {
        basis = BASIS_LAUNCHER;
    } else if (all_have(t, size, BASIS_SLURM)) {
        sort_keys(t, size, BASIS_SLURM, keys);
        if (!all_have(t, size, BASIS_SHM) || slurm_within_shm(t, keys, size)) basis = BASIS_SLURM;
    }
    if (!all_have(t, size, basis)) {
        st = KFAC_ERR(KFAC_ECOMM, "topo: no node identity for some ranks (no launcher node id, "
                                  "SLURM_NODEID or shared-memory domain)");
        goto done;
    }
    sort_keys(t, size, basis, keys);
    /* Groups of equal keys, each named by its first (lowest) rank. */
    int groups = 0;
    for (int i = 0; i < size; i++)
        if (i == 0 || keys[i].key != keys[i - 1].key) firsts[groups++] = (topo_key){keys[i].rank, i};
    qsort(firsts, (size_t)groups, sizeof *firsts, cmp_key); /* by first rank */
    for (int node = 0; node < groups && st == KFAC_OK; node++) {
        int lo = firsts[node].rank, hi = lo + 1;
        while (hi < size && keys[hi].key == keys[lo].key) hi++;
        if (use_launcher_local) st = check_local(t, keys, lo, hi, seen);
        for (int i = lo; i < hi; i++) {
            kfac_rank_info *in = &t[keys[i].rank].info;
            in->node = node;
            in->num_nodes = groups;
            if (!use_launcher_local) {
                in->local_rank = i - lo; /* keys are in rank order within a group */
                in->local_size = hi - lo;
            }
        }
    }
done:
    free(seen);
    free(firsts);
    free(keys);
    return st;
}

typedef struct gpu_use {
    int node;
    uint64_t key;
    int rank;
} gpu_use;

static int cmp_gpu_use(const void *a, const void *b)
{
    const gpu_use *x = a, *y = b;
    if (x->node != y->node) return x->node < y->node ? -1 : 1;
    if (x->key != y->key) return x->key < y->key ? -1 : 1;
    return (x->rank > y->rank) - (x->rank < y->rank);
}

void kfac__topo_mark_shared(kfac__topo_entry *t, int size)
{
    gpu_use *u = malloc((size_t)size * sizeof *u);
    if (!u) return; /* the local round-robin flag stays; only the cross-check is lost */
    int n = 0;
    for (int r = 0; r < size; r++)
        if (t[r].gpu_key) u[n++] = (gpu_use){t[r].info.node, t[r].gpu_key, r};
    qsort(u, (size_t)n, sizeof *u, cmp_gpu_use);
    for (int i = 1; i < n; i++)
        if (u[i].node == u[i - 1].node && u[i].key == u[i - 1].key)
            t[u[i].rank].info.gpu_shared = t[u[i - 1].rank].info.gpu_shared = 1;
    free(u);
}

/* ---- MPI helpers ---- */

static kfac_status mpi_check(int rc, const char *call, const char *file, int line)
{
    if (rc == MPI_SUCCESS) return KFAC_OK;
    char msg[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, msg, &n) != MPI_SUCCESS) snprintf(msg, sizeof msg, "error %d", rc);
    return kfac__set_error(KFAC_ECOMM, file, line, "topo: %s failed: %s", call, msg);
}
#define TOPO_MPI(call, name) mpi_check((call), (name), __FILE__, __LINE__)

/* What init_mpi holds while it runs; released whatever happens. */
typedef struct mpi_ctx {
    MPI_Comm work, intra, inter; /* work: our duplicate of MPI_COMM_WORLD */
    kfac__topo_entry *table;     /* size entries */
    int symmetric;               /* a failure happened on every rank alike */
} mpi_ctx;

/* Every rank learns whether any failed in `phase`; a rank that did not fail
 * returns an error naming the one that did. */
static kfac_status agree(mpi_ctx *c, int rank, kfac_status st, const char *phase)
{
    int in[2] = {(int)st, rank}, out[2];
    kfac_status rc = TOPO_MPI(MPI_Allreduce(in, out, 1, MPI_2INT, MPI_MINLOC, c->work),
                              "MPI_Allreduce");
    if (rc != KFAC_OK) return rc;
    if (out[0] == KFAC_OK) return KFAC_OK;
    c->symmetric = 1;
    if (st != KFAC_OK) return st;
    return KFAC_ERR((kfac_status)out[0], "topo: rank %d failed during %s (%s); see its message",
                    out[1], phase, kfac_status_str((kfac_status)out[0]));
}

static int launched(void)
{
    static const char *vars[] = {"PMIX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return 1;
    }
    return 0;
}

static int env_flag(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* SLURM_NODEID when set and below SLURM_NNODES (when that is set), else -1. */
static int slurm_node_id(void)
{
    const char *id = getenv("SLURM_NODEID"), *nn = getenv("SLURM_NNODES");
    char *end;
    if (!id || !*id) return -1;
    long v = strtol(id, &end, 10);
    if (*end || v < 0 || v > 0x7fffffff) return -1;
    if (nn && *nn) {
        long n = strtol(nn, &end, 10);
        if (*end || v >= n) return -1;
    }
    return (int)v;
}

static kfac_status start_mpi(kfac_topo *t, mpi_ctx *c)
{
    int initialized = 0, finalized = 0, provided;
    MPI_Finalized(&finalized);
    if (finalized)
        return KFAC_ERR(KFAC_ECOMM, "topo: MPI was finalized before kfac_topo_init");
    MPI_Initialized(&initialized);
    if (!initialized) {
        /* OpenMP threads compute; only the main thread calls MPI. */
        KFAC_TRY(TOPO_MPI(MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided),
                          "MPI_Init_thread"));
        t->mpi_started = 1;
    }
    KFAC_TRY(TOPO_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &c->work), "MPI_Comm_dup"));
    MPI_Comm_set_errhandler(c->work, MPI_ERRORS_RETURN);
    KFAC_TRY(TOPO_MPI(MPI_Comm_rank(c->work, &t->rank), "MPI_Comm_rank"));
    KFAC_TRY(TOPO_MPI(MPI_Comm_size(c->work, &t->size), "MPI_Comm_size"));
    return KFAC_OK;
}

/* PMIx on every rank, or on none: a rank whose PMIx did not answer makes
 * all ranks use the MPI fallback.  A PMIx that answers with another rank or
 * size than MPI is an error (two launchers' views of the job disagree). */
static kfac_status discover_pmix(kfac_topo *t, mpi_ctx *c, kfac__pmix_answer *ans)
{
    int ok = 0, all_ok = 0;
    kfac_status st = KFAC_OK;
    if (!env_flag("KFAC_TOPO_NO_PMIX") && kfac__topo_pmix_query(ans) == KFAC_OK) {
        ok = 1;
        if (ans->rank != t->rank || ans->size != t->size)
            st = KFAC_ERR(KFAC_ECOMM,
                          "topo: PMIx says rank %d of %d but MPI says rank %d of %d on %s; "
                          "was the program started by two launchers?",
                          ans->rank, ans->size, t->rank, t->size, ans->host);
    }
    if (st == KFAC_OK) kfac_clear_error(); /* a failed PMIx_Init is not an error here */
    KFAC_TRY(agree(c, t->rank, st, "PMIx discovery"));
    KFAC_TRY(TOPO_MPI(MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, c->work), "MPI_Allreduce"));
    t->source = all_ok ? KFAC_TOPO_PMIX : KFAC_TOPO_MPI;
    return KFAC_OK;
}

/* The world rank of the first rank of this process's shared-memory domain. */
static kfac_status shm_leader(const kfac_topo *t, const mpi_ctx *c, int *leader)
{
    MPI_Comm shm;
    KFAC_TRY(TOPO_MPI(MPI_Comm_split_type(c->work, MPI_COMM_TYPE_SHARED, t->rank, MPI_INFO_NULL,
                                          &shm),
                      "MPI_Comm_split_type(MPI_COMM_TYPE_SHARED)"));
    kfac_status st =
        TOPO_MPI(MPI_Allreduce(&t->rank, leader, 1, MPI_INT, MPI_MIN, shm), "MPI_Allreduce");
    MPI_Comm_free(&shm);
    return st;
}

/* Phase 1: what each rank knows of itself, gathered; then the node ids and
 * local ranks every rank derives alike. */
static kfac_status gather_placement(kfac_topo *t, mpi_ctx *c, const kfac__pmix_answer *ans)
{
    kfac__topo_entry self;
    memset(&self, 0, sizeof self);
    self.info.rank = t->rank;
    self.info.size = t->size;
    self.info.local_rank = self.info.local_size = -1;
    self.info.gpu = self.info.device = -1;
    self.launcher_node = self.shm_leader = -1;
    self.slurm_node = slurm_node_id();
    if (t->source == KFAC_TOPO_PMIX) {
        self.info.local_rank = ans->local_rank;
        self.info.local_size = ans->local_size;
        self.launcher_node = ans->node;
        snprintf(self.info.host, sizeof self.info.host, "%s", ans->host);
    } else {
        KFAC_TRY(shm_leader(t, c, &self.shm_leader));
        kfac__topo_hostname(self.info.host);
    }
    KFAC_TRY(TOPO_MPI(MPI_Allgather(&self, (int)sizeof self, MPI_BYTE, c->table, (int)sizeof self,
                                    MPI_BYTE, c->work),
                      "MPI_Allgather"));
    kfac_status st = kfac__topo_assign_nodes(c->table, t->size, t->source == KFAC_TOPO_PMIX);
    if (st != KFAC_OK) {
        c->symmetric = 1; /* same table, same verdict on every rank */
        return st;
    }
    const kfac_rank_info *me = &c->table[t->rank].info;
    if (t->source == KFAC_TOPO_PMIX && ans->num_nodes > 0 && me->num_nodes > ans->num_nodes)
        st = KFAC_ERR(KFAC_ECOMM, "topo: PMIx node ids name %d nodes but PMIX_NUM_NODES is %d",
                      me->num_nodes, ans->num_nodes);
    return agree(c, t->rank, st, "node assignment");
}

/* Phase 2: this rank's GPU and cores (which depend on its local rank),
 * gathered again; then GPUs used by two ranks of a node are marked shared. */
static kfac_status gather_devices(kfac_topo *t, mpi_ctx *c)
{
    kfac__topo_entry *me = &c->table[t->rank];
    kfac__topo_pick_gpu(getenv("CUDA_VISIBLE_DEVICES"), me->info.local_rank,
                        me->info.local_size, &me->info, &me->gpu_key);
    kfac__topo_cpu_binding(&me->info);
    KFAC_TRY(TOPO_MPI(MPI_Allgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, c->table,
                                    (int)sizeof *c->table, MPI_BYTE, c->work),
                      "MPI_Allgather"));
    kfac__topo_mark_shared(c->table, t->size);
    for (int r = 0; r < t->size; r++) {
        t->ranks[r] = c->table[r].info;
        t->node_of_rank[r] = c->table[r].info.node;
    }
    return KFAC_OK;
}

/* Wraps `comm`, whose members are the world ranks with `want` in the field
 * picked by `by_local` (node, or local rank), in rank order. */
static kfac_status wrap_split(kfac_topo *t, MPI_Comm comm, int by_local, int want, kfac_comm **out)
{
    int *nodes = malloc((size_t)t->size * sizeof *nodes), n = 0;
    if (!nodes) return KFAC_ERR(KFAC_ENOMEM, "topo: out of memory for %d ranks", t->size);
    for (int r = 0; r < t->size; r++)
        if ((by_local ? t->ranks[r].local_rank : t->ranks[r].node) == want)
            nodes[n++] = t->ranks[r].node;
    int csize = -1;
    kfac_status st = TOPO_MPI(MPI_Comm_size(comm, &csize), "MPI_Comm_size");
    if (st == KFAC_OK && csize != n)
        st = KFAC_ERR(KFAC_ECOMM, "topo: the %s communicator of rank %d has %d ranks, expected %d",
                      by_local ? "inter-node" : "intra-node", t->rank, csize, n);
    if (st == KFAC_OK) st = kfac_comm_mpi(&comm, nodes, out);
    free(nodes);
    return st;
}

static kfac_status build_comms(kfac_topo *t, mpi_ctx *c)
{
    const kfac_rank_info *me = &t->ranks[t->rank];
    KFAC_TRY(TOPO_MPI(MPI_Comm_split(c->work, me->node, t->rank, &c->intra),
                      "MPI_Comm_split(node)"));
    KFAC_TRY(TOPO_MPI(MPI_Comm_split(c->work, me->local_rank, t->rank, &c->inter),
                      "MPI_Comm_split(local rank)"));
    kfac_status st = kfac_comm_mpi(&c->work, t->node_of_rank, &t->world);
    if (st == KFAC_OK) st = wrap_split(t, c->intra, 0, me->node, &t->intra);
    if (st == KFAC_OK) st = wrap_split(t, c->inter, 1, me->local_rank, &t->inter);
    return agree(c, t->rank, st, "communicator set-up");
}

static kfac_status init_mpi(kfac_topo *t, mpi_ctx *c)
{
    kfac__pmix_answer ans;
    memset(&ans, 0, sizeof ans);
    KFAC_TRY(start_mpi(t, c));
    t->ranks = calloc((size_t)t->size, sizeof *t->ranks);
    t->node_of_rank = calloc((size_t)t->size, sizeof *t->node_of_rank);
    c->table = calloc((size_t)t->size, sizeof *c->table);
    kfac_status st = t->ranks && t->node_of_rank && c->table
                         ? KFAC_OK
                         : KFAC_ERR(KFAC_ENOMEM, "topo: out of memory for %d ranks", t->size);
    KFAC_TRY(agree(c, t->rank, st, "allocation"));
    KFAC_TRY(discover_pmix(t, c, &ans));
    KFAC_TRY(gather_placement(t, c, &ans));
    KFAC_TRY(gather_devices(t, c));
    return build_comms(t, c);
}

static kfac_status init_single(kfac_topo *t)
{
    t->source = KFAC_TOPO_SINGLE;
    t->rank = 0;
    t->size = 1;
    t->ranks = calloc(1, sizeof *t->ranks);
    t->node_of_rank = calloc(1, sizeof *t->node_of_rank);
    if (!t->ranks || !t->node_of_rank) return KFAC_ERR(KFAC_ENOMEM, "topo: out of memory");
    kfac_rank_info *me = &t->ranks[0];
    me->size = me->local_size = me->num_nodes = 1;
    kfac__topo_hostname(me->host);
    uint64_t key;
    kfac__topo_pick_gpu(getenv("CUDA_VISIBLE_DEVICES"), 0, 1, me, &key);
    kfac__topo_cpu_binding(me);
    KFAC_TRY(kfac_comm_self(&t->world));
    KFAC_TRY(kfac_comm_self(&t->intra));
    return kfac_comm_self(&t->inter);
}

static void release(kfac_topo *t, int finalize_mpi)
{
    kfac_comm_free(t->inter);
    kfac_comm_free(t->intra);
    kfac_comm_free(t->world);
    if (t->mpi_started && finalize_mpi) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized) MPI_Finalize();
    }
    free(t->node_of_rank);
    free(t->ranks);
    free(t);
}

kfac_status kfac_topo_init(kfac_topo **out, int force_mpi)
{
    *out = NULL;
    kfac_topo *t = calloc(1, sizeof *t);
    if (!t) return KFAC_ERR(KFAC_ENOMEM, "topo: out of memory");
    if (!force_mpi && !launched()) {
        kfac_status st = init_single(t);
        if (st != KFAC_OK) {
            release(t, 0);
            return st;
        }
        *out = t;
        return KFAC_OK;
    }
    mpi_ctx c = {MPI_COMM_NULL, MPI_COMM_NULL, MPI_COMM_NULL, NULL, 0};
    kfac_status st = init_mpi(t, &c);
    free(c.table);
    if (c.inter != MPI_COMM_NULL) MPI_Comm_free(&c.inter);
    if (c.intra != MPI_COMM_NULL) MPI_Comm_free(&c.intra);
    if (c.work != MPI_COMM_NULL) MPI_Comm_free(&c.work);
    if (st != KFAC_OK) {
        /* MPI_Finalize is collective: only when every rank fails here too. */
        release(t, c.symmetric);
        return st;
    }
    *out = t;
    return KFAC_OK;
}

void kfac_topo_free(kfac_topo *t)
{
    if (t) release(t, 1);
}

/* ---- accessors ---- */

kfac_topo_source kfac_topo_source_used(const kfac_topo *t) { return t->source; }
const kfac_rank_info *kfac_topo_self(const kfac_topo *t) { return &t->ranks[t->rank]; }

const kfac_rank_info *kfac_topo_rank(const kfac_topo *t, int rank)
{
    return rank >= 0 && rank < t->size ? &t->ranks[rank] : NULL;
}

const int *kfac_topo_node_of_rank(const kfac_topo *t) { return t->node_of_rank; }
kfac_comm *kfac_topo_world(kfac_topo *t) { return t->world; }
kfac_comm *kfac_topo_intra(kfac_topo *t) { return t->intra; }
kfac_comm *kfac_topo_inter(kfac_topo *t) { return t->inter; }

/* ---- node map ---- */

typedef struct map_slot {
    int node, local_rank, rank;
} map_slot;

static int cmp_slot(const void *a, const void *b)
{
    const map_slot *x = a, *y = b;
    if (x->node != y->node) return x->node < y->node ? -1 : 1;
    if (x->local_rank != y->local_rank) return x->local_rank < y->local_rank ? -1 : 1;
    return (x->rank > y->rank) - (x->rank < y->rank);
}

/* One line: "node N HOST: ranks LIST gpus G,G cores C|C nics X|Y"; members are the
 * node's ranks by local rank. */
static void put_node(kfac_strbuf *o, const kfac_topo *t, const map_slot *members, int n,
                     int *scratch)
{
    for (int i = 0; i < n; i++) scratch[i] = members[i].rank;
    for (int i = 1; i < n; i++) /* insertion sort by rank: members are nearly sorted */
        for (int j = i; j > 0 && scratch[j - 1] > scratch[j]; j--) {
            int tmp = scratch[j];
            scratch[j] = scratch[j - 1];
            scratch[j - 1] = tmp;
        }
    kfac__strbuf_add(o, "node %d %s: ranks ", members[0].node, t->ranks[scratch[0]].host);
    size_t room = kfac__strbuf_room(o);
    o->len += (size_t)kfac__topo_range_list(room ? o->p + o->len : NULL, room, scratch, n);
    kfac__strbuf_add(o, " gpus ");
    for (int i = 0; i < n; i++) {
        int gpu = t->ranks[members[i].rank].gpu;
        if (gpu >= 0)
            kfac__strbuf_add(o, "%s%d", i ? "," : "", gpu);
        else
            kfac__strbuf_add(o, "%s-", i ? "," : "");
    }
    kfac__strbuf_add(o, " cores ");
    for (int i = 0; i < n; i++) {
        const char *cores = t->ranks[members[i].rank].cores;
        kfac__strbuf_add(o, "%s%s", i ? "|" : "", cores[0] ? cores : "-");
    }
    kfac__strbuf_add(o, " nics ");
    for (int i = 0; i < n; i++) {
        const char *nic = t->ranks[members[i].rank].nic;
        kfac__strbuf_add(o, "%s%s", i ? "|" : "", nic[0] ? nic : "-");
    }
    kfac__strbuf_add(o, "\n");
}

int kfac_topo_format_map(const kfac_topo *t, char *buf, size_t len)
{
    map_slot *order = malloc((size_t)t->size * sizeof *order);
    int *scratch = malloc((size_t)t->size * sizeof *scratch);
    if (!order || !scratch) {
        free(order);
        free(scratch);
        return -1;
    }
    kfac_strbuf o = kfac__strbuf_init(buf, len);
    for (int r = 0; r < t->size; r++)
        order[r] = (map_slot){t->ranks[r].node, t->ranks[r].local_rank, r};
    qsort(order, (size_t)t->size, sizeof *order, cmp_slot);
    for (int i = 0; i < t->size;) {
        int j = i;
        while (j < t->size && order[j].node == order[i].node) j++;
        put_node(&o, t, order + i, j - i, scratch);
        i = j;
    }
    free(scratch);
    free(order);
    return (int)o.len;
}
