/* fsutil.h - internal: file-system helpers shared by modules. */
#ifndef KFAC_CORE_FSUTIL_H
#define KFAC_CORE_FSUTIL_H

#include "kfac/kfac_status.h"

/* mkdir -p: creates `path` and its missing parents (mode 0777 before the
 * umask).  KFAC_EIO "PATH: cannot create folder: reason", or "PATH: not a
 * folder" when something else is in the way; KFAC_EINVAL for a path
 * longer than PATH_MAX. */
kfac_status kfac__make_dirs(const char *path);

#endif
