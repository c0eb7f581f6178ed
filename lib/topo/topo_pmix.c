/* topo_pmix.c - rank discovery through PMIx, the process-management
 * interface of srun --mpi=pmix and of Open MPI's mpirun.
 *
 * Which keys are answered where (checked with Open MPI 4.1 mpirun and
 * Slurm 22.05's pmix plugin): PMIX_LOCAL_RANK, PMIX_NODEID and
 * PMIX_HOSTNAME for the process itself; PMIX_JOB_SIZE, PMIX_NUM_NODES and
 * PMIX_LOCAL_SIZE for the job (rank PMIX_RANK_WILDCARD).  Each key is asked
 * for the process first and for the job second, so either placement works.
 * Lookups are PMIX_OPTIONAL: answered from what the server already gave
 * this client, never waiting on the server.
 */
#include "topo/topo_internal.h"

#include <pmix.h>
#include <stdio.h>
#include <string.h>

/* The value as a non-negative integer, or -1 for another type. */
static long value_int(const pmix_value_t *v)
{
    switch (v->type) {
    case PMIX_UINT8: return v->data.uint8;
    case PMIX_UINT16: return v->data.uint16;
    case PMIX_UINT32: return (long)v->data.uint32;
    case PMIX_UINT64: return (long)v->data.uint64;
    case PMIX_UINT: return (long)v->data.uint;
    case PMIX_INT: return v->data.integer;
    case PMIX_INT8: return v->data.int8;
    case PMIX_INT16: return v->data.int16;
    case PMIX_INT32: return v->data.int32;
    case PMIX_INT64: return (long)v->data.int64;
    case PMIX_SIZE: return (long)v->data.size;
    case PMIX_PROC_RANK: return (long)v->data.rank;
    default: return -1;
    }
}

/* Looks `key` up for `self`, then for the whole job; NULL if neither
 * answers.  The caller releases the value with PMIX_VALUE_RELEASE. */
static pmix_value_t *get_key(const pmix_proc_t *self, const char *key)
{
    pmix_proc_t job;
    pmix_info_t info;
    bool optional = true;
    pmix_value_t *v = NULL;
    PMIX_PROC_CONSTRUCT(&job);
    PMIX_LOAD_PROCID(&job, self->nspace, PMIX_RANK_WILDCARD);
    PMIX_INFO_CONSTRUCT(&info);
    PMIX_INFO_LOAD(&info, PMIX_OPTIONAL, &optional, PMIX_BOOL);
    if (PMIx_Get(self, key, &info, 1, &v) != PMIX_SUCCESS || !v) {
        v = NULL;
        if (PMIx_Get(&job, key, &info, 1, &v) != PMIX_SUCCESS) v = NULL;
    }
    PMIX_INFO_DESTRUCT(&info);
    return v;
}

static kfac_status get_int(const pmix_proc_t *self, const char *key, int *out)
{
    pmix_value_t *v = get_key(self, key);
    if (!v)
        return KFAC_ERR(KFAC_ECOMM, "topo: PMIx_Get(%s) not answered for rank %u", key,
                        (unsigned)self->rank);
    long x = value_int(v);
    int type = v->type;
    PMIX_VALUE_RELEASE(v);
    if (x < 0 || x > 0x7fffffff)
        return KFAC_ERR(KFAC_ECOMM, "topo: PMIx_Get(%s) gave type %d, not a count", key, type);
    *out = (int)x;
    return KFAC_OK;
}

static kfac_status get_string(const pmix_proc_t *self, const char *key, char *out, size_t len)
{
    pmix_value_t *v = get_key(self, key);
    if (!v)
        return KFAC_ERR(KFAC_ECOMM, "topo: PMIx_Get(%s) not answered for rank %u", key,
                        (unsigned)self->rank);
    kfac_status st = KFAC_OK;
    if (v->type == PMIX_STRING && v->data.string)
        snprintf(out, len, "%s", v->data.string);
    else
        st = KFAC_ERR(KFAC_ECOMM, "topo: PMIx_Get(%s) gave type %d, not a string", key, v->type);
    PMIX_VALUE_RELEASE(v);
    return st;
}

static kfac_status query_all(const pmix_proc_t *self, kfac__pmix_answer *a)
{
    a->rank = (int)self->rank;
    KFAC_TRY(get_int(self, PMIX_JOB_SIZE, &a->size));
    KFAC_TRY(get_int(self, PMIX_LOCAL_RANK, &a->local_rank));
    KFAC_TRY(get_int(self, PMIX_LOCAL_SIZE, &a->local_size));
    KFAC_TRY(get_int(self, PMIX_NODEID, &a->node));
    KFAC_TRY(get_string(self, PMIX_HOSTNAME, a->host, sizeof a->host));
    /* The node count is a cross-check only: the gathered node ids decide. */
    if (get_int(self, PMIX_NUM_NODES, &a->num_nodes) != KFAC_OK) a->num_nodes = -1;
    if (a->rank >= a->size || a->local_rank >= a->local_size)
        return KFAC_ERR(KFAC_ECOMM,
                        "topo: PMIx answers are inconsistent: rank %d of %d, local rank %d of %d",
                        a->rank, a->size, a->local_rank, a->local_size);
    return KFAC_OK;
}

kfac_status kfac__topo_pmix_query(kfac__pmix_answer *out)
{
    pmix_proc_t self;
    memset(out, 0, sizeof *out);
    out->rank = out->size = out->local_rank = out->local_size = -1;
    out->node = out->num_nodes = -1;
    PMIX_PROC_CONSTRUCT(&self);
    pmix_status_t rc = PMIx_Init(&self, NULL, 0);
    if (rc != PMIX_SUCCESS)
        return KFAC_ERR(KFAC_ECOMM, "topo: PMIx_Init failed: %s", PMIx_Error_string(rc));
    kfac_status st = query_all(&self, out);
    PMIx_Finalize(NULL, 0);
    return st;
}
