#include "hfdir.h"

#include "jsonfile.h"

#include "status.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>


struct pa_hfdir {
  char *dir;
  char *config_path;
  cJSON *config;
  size_t n_shards;
  pa_safetensors **shards;
  size_t n;
  const pa_st_tensor **tensors; /* listing order */
  const pa_st_tensor **by_name; /* sorted, for bsearch */
  char *tokenizer_json;
  char *tokenizer_config_path;
  cJSON *tokenizer_config;
  char *chat_template;   /* owned copy */
  const char *bos, *eos; /* into tokenizer_config */
};

static char *join(const char *dir, const char *name) {
  size_t n = strlen(dir) + strlen(name) + 2;
  char *p = malloc(n);
  if (p)
    snprintf(p, n, "%s/%s", dir, name);
  return p;
}

static bool is_file(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}


static int load_object(const char *path, cJSON **out) {
  int rc = pa_json_load(path, out);
  if (!rc && !cJSON_IsObject(*out)) {
    cJSON_Delete(*out);
    *out = NULL;
    rc = pa_error(PA_EFORMAT, "%s: not a JSON object", path);
  }
  return rc;
}

/* ---- tensors ---------------------------------------------------------------- */

static int cmp_tensor_name(const void *a, const void *b) {
  return strcmp((*(const pa_st_tensor *const *)a)->name, (*(const pa_st_tensor *const *)b)->name);
}

/* Fills by_name from tensors and refuses a name listed twice. */
static int index_names(pa_hfdir *h, const char *source) {
  h->by_name = malloc((h->n ? h->n : 1) * sizeof *h->by_name);
  if (!h->by_name)
    return pa_error(PA_ENOMEM, "%s: no memory", source);
  memcpy(h->by_name, h->tensors, h->n * sizeof *h->by_name);
  qsort(h->by_name, h->n, sizeof *h->by_name, cmp_tensor_name);
  for (size_t i = 1; i < h->n; i++)
    if (strcmp(h->by_name[i]->name, h->by_name[i - 1]->name) == 0)
      return pa_error(PA_EFORMAT, "%s: tensor '%.200s' is listed twice", source, h->by_name[i]->name);
  return PA_OK;
}

static int open_single(pa_hfdir *h, const char *path) {
  h->shards = calloc(1, sizeof *h->shards);
  if (!h->shards)
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  int rc = pa_safetensors_open(path, &h->shards[0]);
  if (rc)
    return rc;
  h->n_shards = 1;
  h->n = pa_safetensors_n_tensors(h->shards[0]);
  h->tensors = malloc((h->n ? h->n : 1) * sizeof *h->tensors);
  if (!h->tensors)
    return pa_error(PA_ENOMEM, "%s: no memory", path);
  for (size_t i = 0; i < h->n; i++)
    h->tensors[i] = pa_safetensors_tensor_at(h->shards[0], i);
  return index_names(h, path);
}

/* A shard must be a file directly in the model directory: anything that could
 * climb out of it (or into a subdirectory) is refused, not resolved. */
static bool plain_file_name(const char *s) {
  return s[0] && strcmp(s, ".") != 0 && strcmp(s, "..") != 0 && !strchr(s, '/') && !strchr(s, '\\');
}

static int open_sharded(pa_hfdir *h, const char *index_path) {
  cJSON *index;
  int rc = load_object(index_path, &index);
  if (rc)
    return rc;
  const cJSON *wm = cJSON_GetObjectItemCaseSensitive(index, "weight_map");
  if (!cJSON_IsObject(wm)) {
    cJSON_Delete(index);
    return pa_error(PA_EFORMAT, "%s: \"weight_map\" is %s", index_path, wm ? "not a JSON object" : "missing");
  }
  size_t n = (size_t)cJSON_GetArraySize(wm);
  if (n == 0) {
    cJSON_Delete(index);
    return pa_error(PA_EFORMAT, "%s: \"weight_map\" lists no tensors", index_path);
  }
  /* at most one shard per tensor: an upper bound for the shard table */
  const char **names = calloc(n, sizeof *names);
  size_t *shard_of = calloc(n, sizeof *shard_of);
  h->shards = calloc(n, sizeof *h->shards);
  h->tensors = calloc(n, sizeof *h->tensors);
  if (!names || !shard_of || !h->shards || !h->tensors) {
    rc = pa_error(PA_ENOMEM, "%s: no memory", index_path);
    goto done;
  }
  size_t i = 0;
  for (const cJSON *e = wm->child; e; e = e->next, i++) {
    if (!cJSON_IsString(e)) {
      rc = pa_error(PA_EFORMAT, "%s: weight_map entry for '%.200s' is not a file name string", index_path, e->string);
      goto done;
    }
    if (!plain_file_name(e->valuestring)) {
      rc = pa_error(PA_EFORMAT,
                    "%s: shard '%.200s' (for tensor '%.200s') is not a plain file name in the model directory",
                    index_path, e->valuestring, e->string);
      goto done;
    }
    size_t s = 0;
    while (s < h->n_shards && strcmp(names[s], e->valuestring) != 0)
      s++;
    if (s == h->n_shards)
      names[h->n_shards++] = e->valuestring;
    shard_of[i] = s;
  }
  for (size_t s = 0; s < h->n_shards; s++) {
    char *p = join(h->dir, names[s]);
    if (!p) {
      rc = pa_error(PA_ENOMEM, "%s: no memory", index_path);
      goto done;
    }
    if (access(p, F_OK) != 0) {
      rc = pa_error(PA_ENOTFOUND, "%s: shard '%.200s' is missing (%s: %s)", index_path, names[s], p, strerror(errno));
      free(p);
      goto done;
    }
    rc = pa_safetensors_open(p, &h->shards[s]);
    free(p);
    if (rc) {
      pa_error_prefix(rc, "%s: shard '%.200s': ", index_path, names[s]);
      goto done;
    }
  }
  i = 0;
  for (const cJSON *e = wm->child; e; e = e->next, i++) {
    const pa_st_tensor *t = pa_safetensors_find(h->shards[shard_of[i]], e->string);
    if (!t) {
      rc = pa_error(PA_EFORMAT, "%s: tensor '%.200s' is listed in shard '%.200s', which does not contain it",
                    index_path, e->string, names[shard_of[i]]);
      goto done;
    }
    h->tensors[h->n++] = t;
  }
  rc = index_names(h, index_path);
done:
  /* the tensor views point into the shards, never into the index */
  free(names);
  free(shard_of);
  cJSON_Delete(index);
  return rc;
}

static int open_weights(pa_hfdir *h) {
  char *single = join(h->dir, "model.safetensors");
  char *index = join(h->dir, "model.safetensors.index.json");
  int rc;
  if (!single || !index) {
    rc = pa_error(PA_ENOMEM, "%s: no memory", h->dir);
  } else if (access(single, F_OK) == 0) {
    rc = open_single(h, single);
  } else if (access(index, F_OK) == 0) {
    rc = open_sharded(h, index);
  } else {
    char *bin = join(h->dir, "pytorch_model.bin");
    bool has_bin = bin && access(bin, F_OK) == 0;
    free(bin);
    rc = pa_error(PA_ENOTFOUND, "%s: no model.safetensors or model.safetensors.index.json%s", h->dir,
                  has_bin ? " (pytorch_model.bin is there, but palign reads only safetensors weights)" : "");
  }
  free(single);
  free(index);
  return rc;
}

/* ---- tokenizer_config.json ------------------------------------------------------ */

/* A special token written as "<s>" or as {"content": "<s>", ...}. */
static int token_string(const pa_hfdir *h, const char *key, const char **out) {
  *out = NULL;
  const cJSON *v = cJSON_GetObjectItemCaseSensitive(h->tokenizer_config, key);
  if (!v || cJSON_IsNull(v))
    return PA_OK;
  if (cJSON_IsObject(v))
    v = cJSON_GetObjectItemCaseSensitive(v, "content");
  if (!cJSON_IsString(v))
    return pa_error(PA_EFORMAT, "%s: \"%s\" is neither a string nor an object with a string \"content\"",
                    h->tokenizer_config_path, key);
  *out = v->valuestring;
  return PA_OK;
}

static int read_chat_template(pa_hfdir *h) {
  const cJSON *ct = h->tokenizer_config ? cJSON_GetObjectItemCaseSensitive(h->tokenizer_config, "chat_template") : NULL;
  const char *tmpl = NULL;
  if (cJSON_IsString(ct)) {
    tmpl = ct->valuestring;
  } else if (cJSON_IsArray(ct)) {
    /* several named templates (tool use, RAG ...): the plain chat one is "default" */
    for (const cJSON *e = ct->child; e; e = e->next) {
      const cJSON *name = cJSON_GetObjectItemCaseSensitive(e, "name");
      const cJSON *t = cJSON_GetObjectItemCaseSensitive(e, "template");
      if (!cJSON_IsString(name) || !cJSON_IsString(t))
        return pa_error(PA_EFORMAT, "%s: \"chat_template\" list entries need string \"name\" and \"template\"",
                        h->tokenizer_config_path);
      if (strcmp(name->valuestring, "default") == 0)
        tmpl = t->valuestring;
    }
    if (!tmpl)
      return pa_error(PA_EFORMAT, "%s: \"chat_template\" lists no \"default\" template", h->tokenizer_config_path);
  } else if (ct && !cJSON_IsNull(ct)) {
    return pa_error(PA_EFORMAT, "%s: \"chat_template\" is neither a string nor a list", h->tokenizer_config_path);
  }
  if (tmpl) {
    h->chat_template = strdup(tmpl);
    return h->chat_template ? PA_OK : pa_error(PA_ENOMEM, "%s: no memory", h->tokenizer_config_path);
  }
  /* recent transformers versions save the template beside the config */
  char *jinja = join(h->dir, "chat_template.jinja");
  if (!jinja)
    return pa_error(PA_ENOMEM, "%s: no memory", h->dir);
  int rc = PA_OK;
  if (access(jinja, F_OK) == 0) {
    size_t len;
    rc = pa_read_file(jinja, 16u << 20, &h->chat_template, &len);
    if (!rc && strlen(h->chat_template) != len)
      rc = pa_error(PA_EFORMAT, "%s: contains a NUL byte", jinja);
  }
  free(jinja);
  return rc;
}

static int open_tokenizer(pa_hfdir *h) {
  h->tokenizer_json = join(h->dir, "tokenizer.json");
  char *cfg = join(h->dir, "tokenizer_config.json");
  if (!h->tokenizer_json || !cfg) {
    free(cfg);
    return pa_error(PA_ENOMEM, "%s: no memory", h->dir);
  }
  if (!is_file(h->tokenizer_json)) {
    free(cfg);
    return pa_error(PA_ENOTFOUND, "%s: tokenizer.json is missing or not a file (palign needs the fast-tokenizer file)",
                    h->dir);
  }
  int rc = PA_OK;
  if (access(cfg, F_OK) == 0) {
    h->tokenizer_config_path = cfg;
    if ((rc = load_object(cfg, &h->tokenizer_config)))
      return rc;
    if ((rc = token_string(h, "bos_token", &h->bos)) || (rc = token_string(h, "eos_token", &h->eos)))
      return rc;
  } else {
    free(cfg);
  }
  return read_chat_template(h);
}

int pa_hfdir_open(const char *dir, pa_hfdir **out) {
  *out = NULL;
  pa_hfdir *h = calloc(1, sizeof *h);
  if (!h || !(h->dir = strdup(dir))) {
    free(h);
    return pa_error(PA_ENOMEM, "%s: no memory", dir);
  }
  /* "dir/" and "dir" name the same thing; keep messages tidy */
  for (size_t l = strlen(h->dir); l > 1 && h->dir[l - 1] == '/'; l--)
    h->dir[l - 1] = '\0';
  int rc = PA_OK;
  struct stat sb;
  if (stat(h->dir, &sb) != 0)
    rc = pa_error(errno == ENOENT ? PA_ENOTFOUND : PA_EIO, "%s: cannot open: %s", h->dir, strerror(errno));
  else if (!S_ISDIR(sb.st_mode))
    rc = pa_error(PA_EINVAL, "%s: not a directory", h->dir);
  else if (!(h->config_path = join(h->dir, "config.json")))
    rc = pa_error(PA_ENOMEM, "%s: no memory", h->dir);
  if (!rc)
    rc = load_object(h->config_path, &h->config);
  if (!rc)
    rc = open_weights(h);
  if (!rc)
    rc = open_tokenizer(h);
  if (rc) {
    pa_hfdir_close(h);
    return rc;
  }
  *out = h;
  return PA_OK;
}

void pa_hfdir_close(pa_hfdir *h) {
  if (!h)
    return;
  for (size_t i = 0; i < h->n_shards; i++)
    pa_safetensors_close(h->shards[i]);
  free(h->shards);
  free(h->tensors);
  free(h->by_name);
  cJSON_Delete(h->config);
  cJSON_Delete(h->tokenizer_config);
  free(h->config_path);
  free(h->tokenizer_json);
  free(h->tokenizer_config_path);
  free(h->chat_template);
  free(h->dir);
  free(h);
}

const char *pa_hfdir_path(const pa_hfdir *h) { return h->dir; }
const cJSON *pa_hfdir_config(const pa_hfdir *h) { return h->config; }
const char *pa_hfdir_config_path(const pa_hfdir *h) { return h->config_path; }
size_t pa_hfdir_n_tensors(const pa_hfdir *h) { return h->n; }
size_t pa_hfdir_n_shards(const pa_hfdir *h) { return h->n_shards; }
const char *pa_hfdir_tokenizer_json_path(const pa_hfdir *h) { return h->tokenizer_json; }
const char *pa_hfdir_tokenizer_config_path(const pa_hfdir *h) { return h->tokenizer_config_path; }
const cJSON *pa_hfdir_tokenizer_config(const pa_hfdir *h) { return h->tokenizer_config; }
const char *pa_hfdir_chat_template(const pa_hfdir *h) { return h->chat_template; }
const char *pa_hfdir_bos_token(const pa_hfdir *h) { return h->bos; }
const char *pa_hfdir_eos_token(const pa_hfdir *h) { return h->eos; }

const pa_st_tensor *pa_hfdir_tensor_at(const pa_hfdir *h, size_t i) { return i < h->n ? h->tensors[i] : NULL; }

const pa_st_tensor *pa_hfdir_find_tensor(const pa_hfdir *h, const char *name) {
  size_t lo = 0, hi = h->n;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    int c = strcmp(h->by_name[mid]->name, name);
    if (c == 0)
      return h->by_name[mid];
    if (c < 0)
      lo = mid + 1;
    else
      hi = mid;
  }
  return NULL;
}
