/* topo_local.c - what a process can learn about itself without talking to
 * other ranks: the node's name, the GPU it should use (from
 * CUDA_VISIBLE_DEVICES as Slurm sets it), its CPU binding (hwloc, with
 * sched_getaffinity as the fallback) and the network device nearest to it.
 */
#define _GNU_SOURCE /* sched_getaffinity, CPU_SET */
#include "topo/topo_internal.h"

#include <ctype.h>
#include <hwloc.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum {
    TOPO_MAX_GPUS = 256,   /* CUDA_VISIBLE_DEVICES entries considered */
    TOPO_MAX_ENTRY = 128   /* longest entry kept (a MIG UUID is ~44 characters) */
};

/* Copies src, cut to len - 1 characters (a long FQDN keeps its start). */
static void copy_truncated(char *dst, size_t len, const char *src)
{
    size_t n = strlen(src);
    if (n >= len) n = len - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

void kfac__topo_hostname(char host[KFAC_TOPO_HOST])
{
    const char *slurm = getenv("SLURMD_NODENAME");
    if (slurm && *slurm) {
        copy_truncated(host, KFAC_TOPO_HOST, slurm);
        return;
    }
    char name[256];
    if (gethostname(name, sizeof name) != 0) snprintf(name, sizeof name, "unknown");
    name[sizeof name - 1] = '\0';
    copy_truncated(host, KFAC_TOPO_HOST, name);
}

/* ---- GPU ---- */

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h ? h : 1; /* 0 means "no GPU" */
}

/* Splits a CUDA_VISIBLE_DEVICES value into trimmed, non-empty entries
 * (start offsets and lengths into cvd); returns their number.  Like the
 * CUDA runtime, "-1" or "NoDevFiles" (older Slurm's "nothing allocated")
 * first means no GPU at all. */
static int split_entries(const char *cvd, int *start, int *length)
{
    int n = 0;
    const char *p = cvd;
    while (*p && n < TOPO_MAX_GPUS) {
        while (*p == ',' || isspace((unsigned char)*p)) p++;
        const char *e = p;
        while (*e && *e != ',') e++;
        const char *t = e;
        while (t > p && isspace((unsigned char)t[-1])) t--;
        if (t > p) {
            start[n] = (int)(p - cvd);
            length[n] = (int)(t - p);
            n++;
        }
        p = e;
    }
    if (n > 0) {
        const char *first = cvd + start[0];
        if ((length[0] == 10 && strncmp(first, "NoDevFiles", 10) == 0) || first[0] == '-')
            return 0;
    }
    return n;
}

/* The entry as a physical index when it is a plain non-negative integer. */
static int entry_index(const char *s, int n)
{
    if (n <= 0 || n > 9) return -1;
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i])) return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v;
}

void kfac__topo_pick_gpu(const char *cvd, int local_rank, int local_size, kfac_rank_info *info,
                         uint64_t *key)
{
    int start[TOPO_MAX_GPUS], length[TOPO_MAX_GPUS];
    int n = cvd ? split_entries(cvd, start, length) : 0;
    info->gpu = info->device = -1;
    info->gpu_shared = 0;
    *key = 0;
    if (n == 0) return;
    int device;
    if (n == 1)
        device = 0; /* one GPU per task (--gpus-per-task=1), or one for the node */
    else if (n >= local_size)
        device = local_rank; /* --gpus-per-node: entry local_rank */
    else {
        device = local_rank % n; /* fewer GPUs than local ranks: round-robin */
        info->gpu_shared = 1;
    }
    const char *entry = cvd + start[device];
    int physical = entry_index(entry, length[device]);
    info->device = device;
    info->gpu = physical >= 0 ? physical : device; /* UUIDs: report the position */
    *key = fnv1a(entry, (size_t)length[device]);
}

/* ---- CPU binding ---- */

int kfac__topo_range_list(char *buf, size_t len, const int *sorted, int n)
{
    size_t need = 0;
    if (len) buf[0] = '\0';
    for (int i = 0; i < n;) {
        int j = i;
        while (j + 1 < n && sorted[j + 1] == sorted[j] + 1) j++;
        char part[48];
        int k = j > i ? snprintf(part, sizeof part, "%s%d-%d", i ? "," : "", sorted[i], sorted[j])
                      : snprintf(part, sizeof part, "%s%d", i ? "," : "", sorted[i]);
        if (need + (size_t)k < len) memcpy(buf + need, part, (size_t)k + 1);
        need += (size_t)k;
        i = j + 1;
    }
    if (len && need >= len) buf[0] = '\0'; /* never leave half a list */
    return (int)need;
}

/* Marks a list that did not fit: keeps what fits and ends it with "...". */
static void mark_truncated(char *buf, size_t len)
{
    if (len < 4) return;
    memcpy(buf + len - 4, "...", 4);
}

/* The network device nearest the binding: InfiniBand/RoCE HCAs
 * (OpenFabrics) before plain network interfaces; among the devices local to
 * the binding (or all, if none is), the local_rank-th, so ranks of a node
 * spread over its NICs. */
static void pick_nic(hwloc_topology_t topo, hwloc_const_bitmap_t cpus, int local_rank,
                     char *out, size_t len)
{
    static const hwloc_obj_osdev_type_t kinds[] = {HWLOC_OBJ_OSDEV_OPENFABRICS,
                                                   HWLOC_OBJ_OSDEV_NETWORK};
    out[0] = '\0';
    for (int k = 0; k < 2; k++) {
        const char *local[64], *any[64];
        int nlocal = 0, nany = 0;
        for (hwloc_obj_t o = NULL; (o = hwloc_get_next_osdev(topo, o)) != NULL;) {
            if (o->attr->osdev.type != kinds[k] || !o->name || nany == 64) continue;
            hwloc_obj_t host = hwloc_get_non_io_ancestor_obj(topo, o);
            any[nany++] = o->name;
            if (host && host->cpuset && hwloc_bitmap_intersects(host->cpuset, cpus))
                local[nlocal++] = o->name;
        }
        if (nlocal || nany) {
            snprintf(out, len, "%s", nlocal ? local[local_rank % nlocal] : any[local_rank % nany]);
            return;
        }
    }
}

static int binding_hwloc(kfac_rank_info *info)
{
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) != 0) return -1;
    /* PCI devices and their OS devices (NICs, HCAs), nothing else of I/O. */
    hwloc_topology_set_io_types_filter(topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT);
    int ok = -1;
    hwloc_bitmap_t cpus = hwloc_bitmap_alloc();
    hwloc_bitmap_t nodes = hwloc_bitmap_alloc();
    if (cpus && nodes && hwloc_topology_load(topo) == 0 &&
        hwloc_get_cpubind(topo, cpus, HWLOC_CPUBIND_PROCESS) == 0 && !hwloc_bitmap_iszero(cpus)) {
        if (hwloc_bitmap_list_snprintf(info->cores, sizeof info->cores, cpus) >=
            (int)sizeof info->cores)
            mark_truncated(info->cores, sizeof info->cores);
        info->numa[0] = '\0';
        if (hwloc_cpuset_to_nodeset(topo, cpus, nodes) == 0 && !hwloc_bitmap_iszero(nodes) &&
            hwloc_bitmap_list_snprintf(info->numa, sizeof info->numa, nodes) >=
                (int)sizeof info->numa)
            mark_truncated(info->numa, sizeof info->numa);
        pick_nic(topo, cpus, info->local_rank, info->nic, sizeof info->nic);
        ok = 0;
    }
    hwloc_bitmap_free(nodes);
    hwloc_bitmap_free(cpus);
    hwloc_topology_destroy(topo);
    return ok;
}

static int binding_affinity(kfac_rank_info *info)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    int cpus[CPU_SETSIZE], n = 0;
    for (int c = 0; c < CPU_SETSIZE; c++)
        if (CPU_ISSET(c, &set)) cpus[n++] = c;
    if (kfac__topo_range_list(info->cores, sizeof info->cores, cpus, n) >= (int)sizeof info->cores)
        snprintf(info->cores, sizeof info->cores, "%d-%d(%d cpus)", cpus[0], cpus[n - 1], n);
    info->numa[0] = '\0';
    return n > 0 ? 0 : -1;
}

void kfac__topo_cpu_binding(kfac_rank_info *info)
{
    if (binding_hwloc(info) == 0) return;
    info->nic[0] = '\0';
    if (binding_affinity(info) == 0) return;
    info->cores[0] = info->numa[0] = '\0';
}
