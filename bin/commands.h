/* commands.h - entry points of the kfac subcommands (argv[0] is the
 * subcommand's name); each returns the process exit status. */
#ifndef KFAC_COMMANDS_H
#define KFAC_COMMANDS_H

int kfac_cmd_train(int argc, char **argv);
int kfac_cmd_prep(int argc, char **argv);
int kfac_cmd_stage(int argc, char **argv);

#include <stddef.h>

#include "kfac/kfac_stage.h"

/* Runs kfac_stage_run on every rank of topo; rank 0 prints one line per
 * node and a total on stderr, each starting with `who` (fallbacks always,
 * the rest unless quiet; a progress line on a terminal).  data_dir gets the
 * folder this rank reads, shared_dir (NULL: not wanted) the folder every
 * node can read.  Returns 0, or 1 after printing the error. */
int kfac_stage_and_report(kfac_stage_options *opt, kfac_topo *topo, const char *who, int quiet,
                          char *data_dir, size_t cap, char *shared_dir, size_t shared_cap);

#endif
