/* checksum.c - XXH64 of whole shard files and their check against the
 * manifest.  Files are streamed in 4 MiB reads: big enough to run at disk
 * speed, small enough to stay in cache while XXH64 (several GB/s) digests
 * them. */
#include "kfac/kfac_shards.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

enum { CHUNK = 4 << 20, PATH_CAP = 4096 };

static kfac_status hash_fd(int fd, const char *path, XXH64_state_t *state, uint8_t *buf,
                           uint64_t *bytes)
{
    uint64_t total = 0;
    for (;;) {
        ssize_t got = read(fd, buf, CHUNK);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) return KFAC_ERR(KFAC_EIO, "%s: read error: %s", path, strerror(errno));
        if (got == 0) break;
        XXH64_update(state, buf, (size_t)got);
        total += (uint64_t)got;
    }
    *bytes = total;
    return KFAC_OK;
}

kfac_status kfac_file_xxh64(const char *path, uint64_t *hash, uint64_t *bytes)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return KFAC_ERR(KFAC_EIO, "%s: cannot open: %s", path, strerror(errno));
    posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL); /* only a hint: failure is harmless */
    uint8_t *buf = malloc(CHUNK);
    XXH64_state_t *state = XXH64_createState();
    kfac_status st;
    if (!buf || !state)
        st = KFAC_ERR(KFAC_ENOMEM, "%s: cannot allocate the checksum buffer", path);
    else {
        XXH64_reset(state, 0);
        st = hash_fd(fd, path, state, buf, bytes);
        if (st == KFAC_OK) *hash = XXH64_digest(state);
    }
    XXH64_freeState(state);
    free(buf);
    close(fd);
    return st;
}

kfac_status kfac_shard_verify(const char *dir, const kfac_shard_entry *entry)
{
    char path[PATH_CAP];
    int len = snprintf(path, sizeof path, "%s/%s", dir, entry->file);
    if (len < 0 || (size_t)len >= sizeof path)
        return KFAC_ERR(KFAC_EINVAL, "%s/%s: path too long", dir, entry->file);
    /* the size first: a truncated copy is caught without reading it */
    struct stat st;
    if (stat(path, &st) != 0) return KFAC_ERR(KFAC_EIO, "%s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return KFAC_ERR(KFAC_EIO, "%s: not a regular file", path);
    if ((uint64_t)st.st_size != entry->bytes)
        return KFAC_ERR(KFAC_EFORMAT, "%s: size %" PRIu64 ", expected %" PRIu64, path,
                        (uint64_t)st.st_size, entry->bytes);
    uint64_t hash, bytes;
    KFAC_TRY(kfac_file_xxh64(path, &hash, &bytes));
    if (bytes != entry->bytes)
        return KFAC_ERR(KFAC_EFORMAT, "%s: size %" PRIu64 ", expected %" PRIu64, path, bytes,
                        entry->bytes);
    if (hash != entry->xxh64)
        return KFAC_ERR(KFAC_EFORMAT, "%s: checksum mismatch (expected %016" PRIx64
                        ", got %016" PRIx64 ")", path, entry->xxh64, hash);
    return KFAC_OK;
}
