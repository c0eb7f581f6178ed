/* dataset.c - what every kfac_dataset source shares: freeing through its
 * own destroy function. */
#include "kfac/kfac_dataset.h"

#include <stddef.h>

void kfac_dataset_free(kfac_dataset *ds)
{
    if (ds && ds->destroy) ds->destroy(ds);
}
