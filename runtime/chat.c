/* chat.c: recognising a chat template and rendering one exchange with it. */
#include "chat.h"

#include "tokenizer.h"

#include "status.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct pa_chat_template {
  pa_chat_kind kind;
  char *default_system; /* NULL: none */
};

static const char *const kind_names[] = {"chatml", "llama3", "llama3.1", "llama2", "mistral"};

static int make(pa_chat_kind kind, const char *default_system, size_t dlen, pa_chat_template **out) {
  pa_chat_template *t = calloc(1, sizeof *t);
  if (!t)
    return pa_error(PA_ENOMEM, "chat template: no memory");
  t->kind = kind;
  if (default_system) {
    t->default_system = malloc(dlen + 1);
    if (!t->default_system) {
      free(t);
      return pa_error(PA_ENOMEM, "chat template: no memory");
    }
    memcpy(t->default_system, default_system, dlen);
    t->default_system[dlen] = '\0';
  }
  *out = t;
  return PA_OK;
}

int pa_chat_template_from_name(const char *name, pa_chat_template **out) {
  *out = NULL;
  for (int k = 0; k < (int)(sizeof kind_names / sizeof kind_names[0]); k++)
    if (!strcmp(name, kind_names[k]))
      return make((pa_chat_kind)k, NULL, 0, out);
  return pa_error(PA_EINVAL, "chat template '%.60s' is unknown (choose chatml, llama3, llama3.1, llama2 or mistral)",
                  name);
}

/* SmolLM2's template (and Qwen's) write a whole system turn as a string
 * literal for conversations that bring none: "<|im_start|>system", a newline
 * (real, or the escape \n), the text, "<|im_end|>". That text is the
 * default. Anything that is not plain literal text means no default. */
static int chatml_default(const char *jinja, pa_chat_template **out) {
  static const char open[] = "<|im_start|>system";
  const char *p = strstr(jinja, open);
  while (p) {
    const char *s = p + strlen(open);
    if (*s == '\n')
      s++;
    else if (s[0] == '\\' && s[1] == 'n')
      s += 2;
    else {
      p = strstr(s, open);
      continue;
    }
    const char *e = strstr(s, "<|im_end|>");
    if (!e)
      break;
    /* unescape \n, \t, \', \" and \\ as the Jinja literal means them */
    char *text = malloc((size_t)(e - s) + 1);
    if (!text)
      return pa_error(PA_ENOMEM, "chat template: no memory");
    size_t n = 0;
    bool literal = true;
    for (const char *q = s; q < e && literal; q++) {
      if (*q == '\\' && q + 1 < e) {
        char c = *++q;
        text[n++] = c == 'n' ? '\n' : c == 't' ? '\t' : c;
      } else if (*q == '\'' || *q == '"' || (*q == '{' && q + 1 < e && (q[1] == '{' || q[1] == '%'))) {
        literal = false; /* the string ends or Jinja code starts: not a constant */
      } else {
        text[n++] = *q;
      }
    }
    int rc = literal ? make(PA_CHAT_CHATML, text, n, out) : PA_OK;
    free(text);
    if (rc || literal)
      return rc;
    p = strstr(e, open);
  }
  return make(PA_CHAT_CHATML, NULL, 0, out);
}

int pa_chat_template_from_jinja(const char *jinja, const char *arch, pa_chat_template **out) {
  *out = NULL;
  if (!jinja || !*jinja)
    return make(arch && !strcmp(arch, "mistral") ? PA_CHAT_MISTRAL : PA_CHAT_LLAMA2, NULL, 0, out);
  if (strstr(jinja, "<|start_header_id|>"))
    return make(strstr(jinja, "Cutting Knowledge Date") ? PA_CHAT_LLAMA31 : PA_CHAT_LLAMA3, NULL, 0, out);
  if (strstr(jinja, "<|im_start|>"))
    return chatml_default(jinja, out);
  if (strstr(jinja, "[INST]")) {
    if (strstr(jinja, "<<SYS>>"))
      return make(PA_CHAT_LLAMA2, NULL, 0, out);
    if (strstr(jinja, " [/INST]"))
      return make(PA_CHAT_MISTRAL, NULL, 0, out);
    return pa_error(PA_EUNSUPPORTED,
                    "chat template: an [INST] template without a space before [/INST] (Mistral v3 or later) is not "
                    "supported; choose one with --template chatml|llama3|llama3.1|llama2|mistral");
  }
  return pa_error(PA_EUNSUPPORTED,
                  "chat template: not recognised (it has none of <|im_start|>, <|start_header_id|>, [INST]); choose "
                  "one with --template chatml|llama3|llama3.1|llama2|mistral");
}

void pa_chat_template_destroy(pa_chat_template *t) {
  if (!t)
    return;
  free(t->default_system);
  free(t);
}

pa_chat_kind pa_chat_template_kind(const pa_chat_template *t) { return t->kind; }
const char *pa_chat_template_name(const pa_chat_template *t) { return kind_names[t->kind]; }
const char *pa_chat_template_default_system(const pa_chat_template *t) { return t->default_system; }

const char *pa_chat_template_end_of_turn(const pa_chat_template *t) {
  switch (t->kind) {
  case PA_CHAT_CHATML: return "<|im_end|>";
  case PA_CHAT_LLAMA3:
  case PA_CHAT_LLAMA31: return "<|eot_id|>";
  case PA_CHAT_LLAMA2:
  case PA_CHAT_MISTRAL: return "</s>";
  }
  return "";
}

/* ---- rendering ------------------------------------------------------------ */

typedef struct {
  char *p;
  size_t len, cap;
  bool oom;
} str;

static void put(str *s, const char *a, size_t n) {
  if (s->oom)
    return;
  if (s->len + n + 1 > s->cap) {
    size_t cap = s->cap ? s->cap : 256;
    while (cap < s->len + n + 1)
      cap *= 2;
    char *np = realloc(s->p, cap);
    if (!np) {
      s->oom = true;
      return;
    }
    s->p = np;
    s->cap = cap;
  }
  memcpy(s->p + s->len, a, n);
  s->len += n;
  s->p[s->len] = '\0';
}

static void puts_(str *s, const char *a) { put(s, a, strlen(a)); }

/* Python's str.isspace(), which Jinja's trim and str.strip() use. */
static bool py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

/* The code point at s (length *k), for whitespace tests only: anything that
 * is not well-formed reads as a non-space byte. */
static uint32_t cp_at(const unsigned char *s, size_t n, size_t *k) {
  *k = 1;
  if (s[0] < 0x80)
    return s[0];
  size_t len = s[0] >= 0xF0 ? 4 : s[0] >= 0xE0 ? 3 : s[0] >= 0xC0 ? 2 : 0;
  if (len == 0 || len > n)
    return 0xFFFD;
  uint32_t v = s[0] & (0x7F >> len);
  for (size_t i = 1; i < len; i++) {
    if ((s[i] & 0xC0) != 0x80)
      return 0xFFFD;
    v = (v << 6) | (s[i] & 0x3F);
  }
  *k = len;
  return v;
}

/* Appends a with Python's strip() applied. */
static void put_stripped(str *s, const char *a) {
  const unsigned char *u = (const unsigned char *)a;
  size_t n = strlen(a), b = 0, e = 0, k;
  while (b < n && py_space(cp_at(u + b, n - b, &k)))
    b += k;
  for (size_t i = b; i < n; i += k)
    if (!py_space(cp_at(u + i, n - i, &k)))
      e = i + k;
  if (e > b)
    put(s, a + b, e - b);
}

int pa_chat_render(const pa_chat_template *t, const char *system, const char *user, const char *prefix, char **out) {
  *out = NULL;
  if (!user)
    return pa_error(PA_EINVAL, "chat template %s: no user message", kind_names[t->kind]);
  if (!system)
    system = t->default_system;
  bool open = !prefix || !*prefix; /* the generation prompt */
  str s = {0};
  switch (t->kind) {
  case PA_CHAT_CHATML:
    if (system) {
      puts_(&s, "<|im_start|>system\n");
      puts_(&s, system);
      puts_(&s, "<|im_end|>\n");
    }
    puts_(&s, "<|im_start|>user\n");
    puts_(&s, user);
    puts_(&s, "<|im_end|>\n<|im_start|>assistant\n");
    if (!open)
      puts_(&s, prefix);
    break;
  case PA_CHAT_LLAMA3:
  case PA_CHAT_LLAMA31:
    puts_(&s, "<|begin_of_text|>");
    if (t->kind == PA_CHAT_LLAMA31) {
      puts_(&s, "<|start_header_id|>system<|end_header_id|>\n\n"
                "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n");
      if (system)
        put_stripped(&s, system);
      puts_(&s, "<|eot_id|>");
    } else if (system) {
      puts_(&s, "<|start_header_id|>system<|end_header_id|>\n\n");
      put_stripped(&s, system);
      puts_(&s, "<|eot_id|>");
    }
    puts_(&s, "<|start_header_id|>user<|end_header_id|>\n\n");
    put_stripped(&s, user);
    puts_(&s, "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    if (!open)
      put_stripped(&s, prefix);
    break;
  case PA_CHAT_LLAMA2: {
    /* The template strips the whole first message, <<SYS>> block included. */
    str content = {0};
    if (system) {
      puts_(&content, "<<SYS>>\n");
      puts_(&content, system);
      puts_(&content, "\n<</SYS>>\n\n");
    }
    puts_(&content, user);
    puts_(&s, "<s>[INST] ");
    if (!content.oom)
      put_stripped(&s, content.p);
    s.oom |= content.oom;
    free(content.p);
    puts_(&s, " [/INST]");
    if (!open) {
      puts_(&s, " ");
      put_stripped(&s, prefix);
    }
    break;
  }
  case PA_CHAT_MISTRAL:
    puts_(&s, "<s>[INST] ");
    if (system) {
      puts_(&s, system);
      puts_(&s, "\n\n");
    }
    puts_(&s, user);
    puts_(&s, " [/INST]");
    if (!open)
      puts_(&s, prefix);
    break;
  }
  if (s.oom) {
    free(s.p);
    return pa_error(PA_ENOMEM, "chat template %s: no memory", kind_names[t->kind]);
  }
  *out = s.p;
  return PA_OK;
}

int pa_chat_tokenize(const pa_chat_template *t, const pa_tokenizer *tok, const char *system, const char *user,
                     const char *assistant_prefix, int32_t **ids, size_t *n) {
  char *text = NULL;
  int rc = pa_chat_render(t, system, user, assistant_prefix, &text);
  if (!rc)
    rc = pa_tokenizer_encode(tok, text, strlen(text), PA_TOK_PARSE_SPECIAL, ids, n);
  free(text);
  return rc;
}
