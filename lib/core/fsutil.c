/* fsutil.c - file-system helpers shared by modules (fsutil.h). */
#include "core/fsutil.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

kfac_status kfac__make_dirs(const char *path)
{
    char buf[PATH_MAX];
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf)
        return KFAC_ERR(KFAC_EINVAL, "%s: path too long", path);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        char saved = *p;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            return KFAC_ERR(KFAC_EIO, "%s: cannot create folder: %s", buf, strerror(errno));
        *p = saved;
        if (saved == '\0') break;
    }
    struct stat st;
    if (stat(path, &st) != 0) return KFAC_ERR(KFAC_EIO, "%s: %s", path, strerror(errno));
    if (!S_ISDIR(st.st_mode)) return KFAC_ERR(KFAC_EIO, "%s: not a folder", path);
    return KFAC_OK;
}
