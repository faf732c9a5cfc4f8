/* palign mkmodel: write a tiny random Llama model (GGUF or a Hugging Face
 * directory) for tests and experiments without a download. */
#include "commands.h"
#include "mkmodel.h"
#include "quant.h"
#include "status.h"

#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void mkmodel_usage(FILE *f) {
  pa_mkmodel_opts d = pa_mkmodel_defaults();
  fprintf(f,
          "usage: palign mkmodel OUT [options]\n"
          "Writes a tiny Llama-family model with random weights and a small trained BPE tokenizer.\n"
          "OUT is a .gguf file (--format gguf) or a Hugging Face directory (--format safetensors);\n"
          "without --format, an OUT ending in .gguf means gguf.\n"
          "  --format gguf|safetensors\n"
          "  --arch llama|qwen2  llama (SmolLM2's shape, default) or qwen2 (Q/K/V biases, Qwen's tokenizer rules)\n"
          "  --layers N      transformer blocks (default %d)\n"
          "  --dim D         hidden size (default %d)\n"
          "  --heads H       query heads; D/H must be even (default %d)\n"
          "  --kv-heads K    key/value heads, dividing H (default %d)\n"
          "  --ffn F         feed-forward size (default %d)\n"
          "  --merges M      BPE merges (default %d)\n"
          "  --seed S        weight seed, decimal or 0x-hex (default %" PRIu64 ")\n"
          "  --dtype f32|f16|bf16  storage type (default f32)\n"
          "  --shards N      safetensors files (default 1)\n"
          "  --untied        a separate output projection (default: tied to the embedding)\n"
          "  --ctx N         context length recorded in the metadata (default 2048)\n"
          "  --rope-theta F  RoPE base (default %g)\n"
          "  --norm-eps F    RMSNorm epsilon (default %g)\n"
          "  --force         overwrite an existing file or write into a non-empty directory\n",
          d.n_layers, d.dim, d.n_heads, d.n_kv_heads, d.ffn_dim, d.n_merges, d.seed, (double)d.rope_theta,
          (double)d.norm_eps);
}

__attribute__((format(printf, 1, 2))) static int usage_error(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  fprintf(stderr, "palign mkmodel: ");
  vfprintf(stderr, fmt, ap);
  fprintf(stderr, "\n(palign mkmodel --help for the options)\n");
  va_end(ap);
  return 2;
}

static bool parse_i32(const char *s, int32_t lo, int32_t hi, int32_t *out) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < lo || v > hi)
    return false;
  *out = (int32_t)v;
  return true;
}

/* Decimal or 0x-hexadecimal; never octal, so --seed 010 means ten. */
static bool parse_u64(const char *s, uint64_t *out) {
  bool hex = s[0] == '0' && (s[1] == 'x' || s[1] == 'X');
  const char *digits = hex ? s + 2 : s;
  /* strtoull alone would also take a sign or leading spaces */
  if (!(hex ? isxdigit((unsigned char)digits[0]) : isdigit((unsigned char)digits[0])))
    return false;
  char *end;
  errno = 0;
  unsigned long long v = strtoull(digits, &end, hex ? 16 : 10);
  if (errno || *end)
    return false;
  *out = v;
  return true;
}

int cmd_mkmodel(int argc, char **argv) {
  pa_mkmodel_opts o = pa_mkmodel_defaults();
  const char *out = NULL, *format = NULL;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
      mkmodel_usage(stdout);
      return 0;
    }
    if (a[0] != '-' || a[1] == '\0') {
      if (out)
        return usage_error("unexpected argument '%s' (OUT is already '%s')", a, out);
      out = a;
      continue;
    }
    if (strcmp(a, "--untied") == 0) {
      o.tied = false;
      continue;
    }
    if (strcmp(a, "--force") == 0) {
      o.force = true;
      continue;
    }
    /* every other option takes a value, as --opt V or --opt=V */
    static const char *const with_value[] = {"--layers", "--dim",    "--heads",      "--kv-heads", "--ffn",
                                             "--merges", "--shards", "--seed",       "--dtype",    "--format",
                                             "--ctx",    "--arch",   "--rope-theta", "--norm-eps"};
    char name[32];
    const char *val;
    const char *eq = strchr(a, '=');
    size_t nlen = eq ? (size_t)(eq - a) : strlen(a);
    bool known = false;
    for (size_t k = 0; k < sizeof with_value / sizeof with_value[0] && !known; k++)
      known = strlen(with_value[k]) == nlen && strncmp(with_value[k], a, nlen) == 0;
    if (!known)
      return usage_error("unknown option '%.*s'", (int)nlen, a);
    memcpy(name, a, nlen);
    name[nlen] = '\0';
    if (eq) {
      val = eq + 1;
    } else {
      if (i + 1 >= argc)
        return usage_error("option %s needs a value", a);
      val = argv[++i];
    }
    struct {
      const char *name;
      int32_t *dst;
      int32_t lo, hi;
    } ints[] = {
        {"--layers", &o.n_layers, 1, 1024},   {"--dim", &o.dim, 2, 65536},
        {"--heads", &o.n_heads, 1, 65536},    {"--kv-heads", &o.n_kv_heads, 1, 65536},
        {"--ffn", &o.ffn_dim, 1, 1 << 20},    {"--merges", &o.n_merges, 0, 100000},
        {"--shards", &o.n_shards, 1, 100000}, {"--ctx", &o.max_seq, 1, 1 << 24},
    };
    bool done = false;
    for (size_t k = 0; k < sizeof ints / sizeof ints[0] && !done; k++) {
      if (strcmp(name, ints[k].name) != 0)
        continue;
      if (!parse_i32(val, ints[k].lo, ints[k].hi, ints[k].dst))
        return usage_error("%s '%s' is not an integer from %d to %d", name, val, ints[k].lo, ints[k].hi);
      done = true;
    }
    if (done)
      continue;
    if (strcmp(name, "--seed") == 0) {
      if (!parse_u64(val, &o.seed))
        return usage_error("--seed '%s' is not an unsigned 64-bit integer", val);
    } else if (strcmp(name, "--dtype") == 0) {
      if (strcmp(val, "f32") == 0)
        o.dtype = PA_F32;
      else if (strcmp(val, "f16") == 0)
        o.dtype = PA_F16;
      else if (strcmp(val, "bf16") == 0)
        o.dtype = PA_BF16;
      else
        return usage_error("--dtype '%s': expected f32, f16 or bf16", val);
    } else if (strcmp(name, "--rope-theta") == 0 || strcmp(name, "--norm-eps") == 0) {
      char *end;
      errno = 0;
      const float v = strtof(val, &end);
      if (errno || end == val || *end || !(v > 0) || !isfinite(v))
        return usage_error("%s '%s' is not a positive number", name, val);
      *(strcmp(name, "--norm-eps") == 0 ? &o.norm_eps : &o.rope_theta) = v;
    } else if (strcmp(name, "--arch") == 0) {
      if (strcmp(val, "llama") == 0)
        o.arch = PA_MK_LLAMA;
      else if (strcmp(val, "qwen2") == 0)
        o.arch = PA_MK_QWEN2;
      else
        return usage_error("--arch '%s': expected llama or qwen2", val);
    } else if (strcmp(name, "--format") == 0) {
      if (strcmp(val, "gguf") != 0 && strcmp(val, "safetensors") != 0)
        return usage_error("--format '%s': expected gguf or safetensors", val);
      format = val;
    }
  }
  if (!out) {
    mkmodel_usage(stderr);
    return 2;
  }
  if (!format) {
    size_t n = strlen(out);
    format = n > 5 && strcmp(out + n - 5, ".gguf") == 0 ? "gguf" : "safetensors";
  }
  bool gguf = strcmp(format, "gguf") == 0;
  if (gguf && o.n_shards != 1)
    return usage_error("--shards applies to the safetensors format only");
  /* option conflicts (heads not dividing dim ...) are usage errors too */
  if (pa_mkmodel_validate(&o) != PA_OK) {
    fprintf(stderr, "palign: %s\n", pa_errmsg());
    return 2;
  }
  int rc = gguf ? pa_mkmodel_write_gguf(&o, out) : pa_mkmodel_write_hf(&o, out);
  if (rc) {
    fprintf(stderr, "palign: %s\n", pa_errmsg());
    return 1;
  }
  printf("wrote %s (%s, %s, %d layers, dim %d, %s)\n", out, gguf ? "gguf" : "safetensors", pa_mkmodel_arch_name(o.arch),
         o.n_layers, o.dim,
         o.dtype == PA_F32   ? "f32"
         : o.dtype == PA_F16 ? "f16"
                             : "bf16");
  return 0;
}
