/* cli_util.h: what palign's command lines share: reading flag values with
 * messages that name the program, the flag and the value, and where the
 * cache of downloaded and computed files is. */
#ifndef PALIGN_CLI_UTIL_H
#define PALIGN_CLI_UTIL_H

#include <stddef.h>
#include <stdio.h>

/* v as a whole number in [lo, hi] into *out: 0, or -1 after printing
 * "PROG: FLAG must be an integer in LO..HI, not 'V'" to err (NULL: silent,
 * for MPI ranks that leave the talking to rank 0). */
int pa_arg_int(FILE *err, const char *prog, const char *flag, const char *v, long long lo, long long hi,
               long long *out);
/* v as a number in [lo, hi] into *out (finite); 0 or -1 as pa_arg_int. */
int pa_arg_num(FILE *err, const char *prog, const char *flag, const char *v, double lo, double hi, double *out);

/* The DPO flags palign eval and palign-worker share (--dpo-epochs N,
 * --dpo-batch N, --dpo-lr X, --dpo-beta X, --dpo-rank N, --dpo-alpha X,
 * --dpo-weight-decay X): when flag is one, its value into o and 1 (or -1
 * after a message for a value that is not a number); 0 when it is not one.
 * Values in range are pa_dpo_validate's business. */
int pa_dpo_flag(FILE *err, const char *prog, const char *flag, const char *v, void *dpo_opts);
/* Their help, a line each, the descriptions at column (counting from 0)
 * as the command's own help has them; a flag reaching it has its
 * description on the next line. */
void pa_dpo_flags_help(FILE *f, int column);

/* --backend's value checked (cpu, cuda or auto): 0, or -1 after printing
 * "PROG: --backend is cpu, cuda or auto, not 'V'" to err. */
int pa_backend_arg(FILE *err, const char *prog, const char *v);
/* Help for --backend and --weights, as pa_dpo_flags_help's. */
void pa_backend_help(FILE *f, int column);
/* --weights' value checked (auto, fp32 or bf16): 0, or -1 after printing
 * "PROG: --weights is auto, fp32 or bf16, not 'V'" to err. */
int pa_weights_arg(FILE *err, const char *prog, const char *v);

/* $PALIGN_CACHE/file, or ~/.cache/palign/file, into buf (size n); returns buf. */
const char *pa_cache_file(const char *file, char *buf, size_t n);

#endif
