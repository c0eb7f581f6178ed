/* commands.h - entry points of the kfac subcommands (argv[0] is the
 * subcommand's name); each returns the process exit status. */
#ifndef KFAC_COMMANDS_H
#define KFAC_COMMANDS_H

int kfac_cmd_train(int argc, char **argv);

#endif
