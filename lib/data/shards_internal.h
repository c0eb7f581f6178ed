/* shards_internal.h - internal helpers shared by the shard writer, the
 * manifest and the shard reader (kfac_shards.h). */
#ifndef KFAC_DATA_SHARDS_INTERNAL_H
#define KFAC_DATA_SHARDS_INTERNAL_H

#include "kfac/kfac_status.h"

/* Makes the finished temporary file `tmp` durable as `path`: fsync, rename,
 * fsync of the folder, so a crash leaves either the old file or the whole
 * new one.  Removes `tmp` on failure.  (manifest.c) */
kfac_status kfac__publish_file(const char *tmp, const char *path);

/* Records a failed HDF5 call as "PATH: WHAT: <innermost HDF5 message>".
 * Call it right after the failing call: any further HDF5 call clears the
 * error stack.  (shard_write.c) */
kfac_status kfac__h5_error(kfac_status status, const char *file, int line, const char *path,
                           const char *what);
#define KFAC_H5_ERR(status, path, what) kfac__h5_error((status), __FILE__, __LINE__, (path), (what))

#endif
