/* prep_mpi.c - the MPI calls of `kfac prep` (prep_internal.h): start MPI
 * only under a launcher, agree on failures so no rank waits in a
 * collective for one that gave up, and gather results on rank 0.  Only
 * the main thread calls MPI (MPI_THREAD_FUNNELED). */
#include "data/prep_internal.h"

#include <limits.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { MESSAGE_MAX = 1024 };

static kfac_status mpi_fail(int rc, const char *what)
{
    char text[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) snprintf(text, sizeof text, "error %d", rc);
    return KFAC_ERR(KFAC_ECOMM, "%s failed: %s", what, text);
}

#define MPI_TRY(call, what)                                  \
    do {                                                     \
        int rc__ = (call);                                   \
        if (rc__ != MPI_SUCCESS) return mpi_fail(rc__, what); \
    } while (0)

/* Set by Open MPI's mpirun, by PMIx launchers (srun --mpi=pmix, prterun)
 * and by PMI-1/2 launchers. */
static int launched(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_SIZE"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return 1;
    }
    return 0;
}

kfac_status kfac__prep_mpi_init(kfac__prep_mpi *m)
{
    memset(m, 0, sizeof *m);
    m->size = 1;
    int initialized = 0;
    MPI_Initialized(&initialized);
    if (!initialized && !launched()) return KFAC_OK;
    if (!initialized) {
        int provided;
        MPI_TRY(MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
        m->started = 1;
    }
    MPI_Comm *comm = malloc(sizeof *comm);
    if (!comm) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate a communicator");
    m->comm = comm;
    MPI_TRY(MPI_Comm_dup(MPI_COMM_WORLD, comm), "MPI_Comm_dup");
    MPI_Comm_set_errhandler(*comm, MPI_ERRORS_RETURN);
    MPI_TRY(MPI_Comm_rank(*comm, &m->rank), "MPI_Comm_rank");
    MPI_TRY(MPI_Comm_size(*comm, &m->size), "MPI_Comm_size");
    return KFAC_OK;
}

void kfac__prep_mpi_finish(kfac__prep_mpi *m)
{
    if (m->comm) {
        MPI_Comm_free((MPI_Comm *)m->comm);
        free(m->comm);
    }
    if (m->started) MPI_Finalize();
    memset(m, 0, sizeof *m);
}

kfac_status kfac__prep_mpi_agree(kfac__prep_mpi *m, kfac_status st)
{
    if (!m->comm) return st;
    MPI_Comm comm = *(MPI_Comm *)m->comm;
    int in[2] = {(int)st, m->rank}, out[2];
    MPI_TRY(MPI_Allreduce(in, out, 1, MPI_2INT, MPI_MINLOC, comm), "MPI_Allreduce");
    if (out[0] == KFAC_OK) return KFAC_OK;
    char message[MESSAGE_MAX];
    snprintf(message, sizeof message, "%s", kfac_last_error());
    MPI_TRY(MPI_Bcast(message, MESSAGE_MAX, MPI_CHAR, out[1], comm), "MPI_Bcast");
    message[MESSAGE_MAX - 1] = '\0';
    if (out[1] == 0) return KFAC_ERR((kfac_status)out[0], "%s", message);
    /* the failing rank's host travels with its message */
    char host[256] = "?";
    if (m->rank == out[1]) gethostname(host, sizeof host - 1);
    MPI_TRY(MPI_Bcast(host, sizeof host, MPI_CHAR, out[1], comm), "MPI_Bcast");
    host[sizeof host - 1] = '\0';
    return KFAC_ERR((kfac_status)out[0], "rank %d on %s: %s", out[1], host, message);
}

kfac_status kfac__prep_mpi_gather(kfac__prep_mpi *m, const void *mine, size_t n, uint8_t **all,
                                  size_t *all_n)
{
    *all = NULL;
    *all_n = 0;
    if (!m->comm) {
        *all = malloc(n ? n : 1);
        if (!*all) return KFAC_ERR(KFAC_ENOMEM, "cannot allocate %zu bytes", n);
        if (n) memcpy(*all, mine, n);
        *all_n = n;
        return KFAC_OK;
    }
    MPI_Comm comm = *(MPI_Comm *)m->comm;
    if (n > INT_MAX) return KFAC_ERR(KFAC_EINVAL, "%zu bytes of results on one rank (limit %d)", n, INT_MAX);
    int count = (int)n, *counts = NULL, *displs = NULL;
    kfac_status st = KFAC_OK;
    if (m->rank == 0) {
        counts = calloc((size_t)m->size, sizeof *counts);
        displs = calloc((size_t)m->size, sizeof *displs);
        if (!counts || !displs) st = KFAC_ERR(KFAC_ENOMEM, "cannot allocate gather counts");
    }
    /* each step is agreed on, so no rank enters a collective another left */
    st = kfac__prep_mpi_agree(m, st);
    int rc = MPI_SUCCESS;
    if (st == KFAC_OK) {
        rc = MPI_Gather(&count, 1, MPI_INT, counts, 1, MPI_INT, 0, comm);
        if (rc != MPI_SUCCESS) st = mpi_fail(rc, "MPI_Gather");
    }
    size_t total = 0;
    if (st == KFAC_OK && m->rank == 0) {
        for (int r = 0; r < m->size; r++) {
            displs[r] = (int)total;
            total += (size_t)counts[r];
        }
        if (total > INT_MAX) st = KFAC_ERR(KFAC_EINVAL, "%zu bytes of results (limit %d)", total, INT_MAX);
        else if (!(*all = malloc(total ? total : 1))) st = KFAC_ERR(KFAC_ENOMEM, "cannot allocate %zu bytes", total);
    }
    st = kfac__prep_mpi_agree(m, st);
    if (st == KFAC_OK) {
        rc = MPI_Gatherv(mine, count, MPI_BYTE, *all, counts, displs, MPI_BYTE, 0, comm);
        if (rc != MPI_SUCCESS) st = mpi_fail(rc, "MPI_Gatherv");
        st = kfac__prep_mpi_agree(m, st);
    }
    free(counts);
    free(displs);
    if (st != KFAC_OK) {
        free(*all);
        *all = NULL;
        return st;
    }
    *all_n = m->rank == 0 ? total : 0;
    return KFAC_OK;
}
