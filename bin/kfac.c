/* kfac.c - the `kfac` command: dispatches to subcommands. */
#include <stdio.h>
#include <string.h>

#include "commands.h"

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} COMMANDS[] = {
    {"train", kfac_cmd_train, "train a model from a job YAML (one process or one rank per GPU/core under srun/mpirun)"},
    {"prep", kfac_cmd_prep, "convert JPEG/PNG folders or IDX files into HDF5 shards"},
    {"stage", kfac_cmd_stage, "copy a dataset's shards to node-local storage, once per node"},
};

static void usage(FILE *out)
{
    fprintf(out,
            "usage: kfac <command> [options]\n"
            "\n"
            "kfac-hpc: distributed K-FAC training of ResNets on CPU and GPU clusters.\n"
            "\n"
            "commands:\n");
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        fprintf(out, "  %-8s %s\n", COMMANDS[i].name, COMMANDS[i].summary);
    fprintf(out, "\nRun 'kfac <command> --help' for a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof COMMANDS / sizeof COMMANDS[0]; i++)
        if (strcmp(argv[1], COMMANDS[i].name) == 0) return COMMANDS[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kfac: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
