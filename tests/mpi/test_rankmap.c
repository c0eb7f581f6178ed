/* test_rankmap.c - runs kfac_topo_init under whatever launched it (srun,
 * mpirun, or nothing) and checks the answer is self-consistent.
 *
 * Rank 0 prints the node map (kfac_topo_format_map), then one line per rank
 * in rank order:
 *   rank=R size=S local_rank=L local_size=LS node=N num_nodes=NN host=H
 *   gpu=G device=D cores=C source=SRC shared=0|1 numa=M nic=X slurm_node=SN cvd=V
 * (one line each; slurm_node and cvd are SLURMD_NODENAME and
 * CUDA_VISIBLE_DEVICES as the launcher set them for that rank, "-" when
 * unset, for tests/mpi/rankmap_check.sh to compare against).  Then it checks:
 * rank and size agree with MPI; every rank holds the same table; local ranks
 * of each node are 0..local_size-1; node ids are 0..num_nodes-1 in order of
 * each node's first rank; the intra communicator has local_size ranks and
 * the inter communicator of local rank 0 has num_nodes; sums over the world,
 * intra and inter communicators count their ranks; the NIC, when one was
 * found, is a device of this host (/sys/class/net or /sys/class/infiniband).  Exits 1 on any failure
 * (every rank alike), after printing what failed.  --force-mpi passes
 * force_mpi (an MPI singleton when no launcher started it).
 */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kfac/kfac_topo.h"

enum { LINE = 1024 };

static int failures;

#define CHECK(cond, ...)                                          \
    do {                                                          \
        if (!(cond)) {                                            \
            fprintf(stderr, "test_rankmap: rank %d: FAIL ", me);  \
            fprintf(stderr, __VA_ARGS__);                         \
            fprintf(stderr, " (%s:%d)\n", __FILE__, __LINE__);    \
            failures++;                                           \
        }                                                         \
    } while (0)

static const char *or_dash(const char *s) { return s && *s ? s : "-"; }

static void format_line(const kfac_topo *t, char *line)
{
    const kfac_rank_info *r = kfac_topo_self(t);
    snprintf(line, LINE,
             "rank=%d size=%d local_rank=%d local_size=%d node=%d num_nodes=%d host=%s gpu=%d "
             "device=%d cores=%s source=%s shared=%d numa=%s nic=%s slurm_node=%s cvd=%s",
             r->rank, r->size, r->local_rank, r->local_size, r->node, r->num_nodes, r->host,
             r->gpu, r->device, or_dash(r->cores), kfac_topo_source_name(kfac_topo_source_used(t)),
             r->gpu_shared, or_dash(r->numa), or_dash(r->nic), or_dash(getenv("SLURMD_NODENAME")),
             or_dash(getenv("CUDA_VISIBLE_DEVICES")));
}

/* A hash of the fields every rank must agree on. */
static uint64_t table_hash(const kfac_topo *t, int size)
{
    uint64_t h = 1469598103934665603ull;
    for (int r = 0; r < size; r++) {
        const kfac_rank_info *i = kfac_topo_rank(t, r);
        int v[] = {i->rank, i->size, i->local_rank, i->local_size, i->node, i->num_nodes,
                   i->gpu, i->device, i->gpu_shared};
        for (size_t k = 0; k < sizeof v / sizeof v[0]; k++) h = (h ^ (uint64_t)v[k]) * 1099511628211ull;
        for (const char *c = i->host; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
        for (const char *c = i->cores; *c; c++) h = (h ^ (unsigned char)*c) * 1099511628211ull;
    }
    return h;
}

/* Checks on the table alone (the same on every rank). */
static void check_table(const kfac_topo *t, int me, int size)
{
    const int *node_of = kfac_topo_node_of_rank(t);
    int num_nodes = kfac_topo_rank(t, 0)->num_nodes;
    CHECK(num_nodes >= 1 && num_nodes <= size, "num_nodes %d for %d ranks", num_nodes, size);
    int next_new = 0; /* node ids appear in order of each node's first rank */
    for (int r = 0; r < size; r++) {
        const kfac_rank_info *i = kfac_topo_rank(t, r);
        CHECK(i->rank == r && i->size == size, "entry %d says rank %d of %d", r, i->rank, i->size);
        CHECK(i->num_nodes == num_nodes, "rank %d: num_nodes %d, rank 0: %d", r, i->num_nodes,
              num_nodes);
        CHECK(node_of[r] == i->node, "node_of_rank[%d] = %d, entry says %d", r, node_of[r],
              i->node);
        CHECK(i->node >= 0 && i->node <= next_new, "rank %d: node %d, expected <= %d", r, i->node,
              next_new);
        if (i->node == next_new) next_new++;
        CHECK(i->device < 0 || i->gpu >= 0, "rank %d: device %d without gpu", r, i->device);
    }
    CHECK(next_new == num_nodes, "%d node ids used, num_nodes %d", next_new, num_nodes);
    for (int n = 0; n < num_nodes; n++) {
        int count = 0, local_size = -1;
        unsigned long long seen = 0; /* local ranks < 64 checked bit by bit */
        const char *host = NULL;
        for (int r = 0; r < size; r++) {
            const kfac_rank_info *i = kfac_topo_rank(t, r);
            if (i->node != n) continue;
            count++;
            if (!host) host = i->host;
            CHECK(strcmp(host, i->host) == 0, "node %d has hosts %s and %s", n, host, i->host);
            if (local_size < 0) local_size = i->local_size;
            CHECK(i->local_size == local_size, "node %d: local sizes %d and %d", n, local_size,
                  i->local_size);
            CHECK(i->local_rank >= 0 && i->local_rank < i->local_size,
                  "rank %d: local rank %d of %d", r, i->local_rank, i->local_size);
            if (i->local_rank >= 0 && i->local_rank < 64) {
                CHECK(!(seen >> i->local_rank & 1), "node %d: local rank %d twice", n,
                      i->local_rank);
                seen |= 1ull << i->local_rank;
            }
        }
        CHECK(count == local_size, "node %d runs %d ranks, local_size %d", n, count, local_size);
    }
}

/* The node map: one line per node, and snprintf's size contract. */
static void check_map(const kfac_topo *t, int me, int num_nodes)
{
    int need = kfac_topo_format_map(t, NULL, 0);
    CHECK(need > 0, "format_map needs %d characters", need);
    if (need <= 0) return;
    char *map = malloc((size_t)need + 1), small[8];
    int got = kfac_topo_format_map(t, map, (size_t)need + 1);
    CHECK(got == need && (int)strlen(map) == need, "format_map wrote %d of %d", got, need);
    CHECK(kfac_topo_format_map(t, small, sizeof small) == need && strlen(small) < sizeof small,
          "format_map into a short buffer");
    int lines = 0;
    for (const char *c = map; *c; c++) lines += *c == '\n';
    CHECK(lines == num_nodes, "node map has %d lines for %d nodes", lines, num_nodes);
    if (me == 0) fputs(map, stdout);
    free(map);
}

/* A NIC hwloc named must be one of this host's network devices. */
static void check_nic(const kfac_rank_info *self, int me)
{
    if (!self->nic[0]) return;
    char net[128], ib[128];
    snprintf(net, sizeof net, "/sys/class/net/%s", self->nic);
    snprintf(ib, sizeof ib, "/sys/class/infiniband/%s", self->nic);
    CHECK(access(net, F_OK) == 0 || access(ib, F_OK) == 0, "nic %s is not a device of this host",
          self->nic);
}

/* Sums of 1 over each communicator count its ranks. */
static void check_comms(kfac_topo *t, int me)
{
    const kfac_rank_info *self = kfac_topo_self(t);
    struct {
        kfac_comm *c;
        const char *name;
        int want;
    } comms[] = {{kfac_topo_world(t), "world", self->size},
                 {kfac_topo_intra(t), "intra", self->local_size},
                 {kfac_topo_inter(t), "inter", -1}};
    if (self->local_rank == 0) comms[2].want = self->num_nodes;
    for (int k = 0; k < 3; k++) {
        int csize = kfac_comm_size(comms[k].c);
        if (comms[k].want >= 0)
            CHECK(csize == comms[k].want, "%s communicator has %d ranks, expected %d",
                  comms[k].name, csize, comms[k].want);
        float one = 1.0f;
        kfac_status st = kfac_comm_allreduce(comms[k].c, &one, 1, KFAC_F32, KFAC_STAGE_OTHER);
        CHECK(st == KFAC_OK && one == (float)csize, "%s allreduce: status %d, sum %g of %d",
              comms[k].name, (int)st, (double)one, csize);
    }
    CHECK(kfac_comm_rank(kfac_topo_world(t)) == self->rank, "world comm rank %d, rank %d",
          kfac_comm_rank(kfac_topo_world(t)), self->rank);
}

int main(int argc, char **argv)
{
    int force_mpi = argc > 1 && strcmp(argv[1], "--force-mpi") == 0;
    if (argc > 1 && !force_mpi) {
        fprintf(stderr, "usage: test_rankmap [--force-mpi]\n");
        return 2;
    }
    kfac_topo *t;
    kfac_status st = kfac_topo_init(&t, force_mpi);
    if (st != KFAC_OK) {
        fprintf(stderr, "test_rankmap: kfac_topo_init: %s: %s @ %s\n", kfac_status_str(st),
                kfac_last_error(), kfac_last_error_where());
        return 1;
    }
    int single = kfac_topo_source_used(t) == KFAC_TOPO_SINGLE;
    const kfac_rank_info *self = kfac_topo_self(t);
    int me = self->rank, size = self->size;
    if (!single) {
        int mpi_rank = -1, mpi_size = -1;
        MPI_Comm_rank(MPI_COMM_WORLD, &mpi_rank);
        MPI_Comm_size(MPI_COMM_WORLD, &mpi_size);
        CHECK(mpi_rank == me && mpi_size == size, "topo says rank %d of %d, MPI %d of %d", me,
              size, mpi_rank, mpi_size);
    } else {
        CHECK(me == 0 && size == 1, "single process is rank %d of %d", me, size);
    }
    check_table(t, me, size);
    check_map(t, me, self->num_nodes);
    check_nic(self, me);
    if (me == 0) fflush(stdout);

    char line[LINE] = {0};
    format_line(t, line);
    if (single) {
        puts(line);
    } else {
        char *all = me == 0 ? calloc((size_t)size, LINE) : NULL;
        MPI_Gather(line, LINE, MPI_CHAR, all, LINE, MPI_CHAR, 0, MPI_COMM_WORLD);
        for (int r = 0; me == 0 && r < size; r++) puts(all + (size_t)r * LINE);
        free(all);
        fflush(stdout);
        uint64_t h = table_hash(t, size), lo = 0, hi = 0;
        MPI_Allreduce(&h, &lo, 1, MPI_UINT64_T, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(&h, &hi, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
        CHECK(lo == hi, "ranks hold different tables");
    }
    check_comms(t, me);

    int total = failures;
    if (!single) MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (me == 0) printf("test_rankmap: %s (%d failed checks)\n", total ? "FAIL" : "OK", total);
    kfac_topo_free(t);
    return total ? 1 : 0;
}
