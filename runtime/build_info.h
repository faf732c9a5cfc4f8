#ifndef PALIGN_BUILD_INFO_H
#define PALIGN_BUILD_INFO_H

/* How this binary was made, for the files palign writes (the store's
 * manifest, the activation bank's header) and `palign --version`. Written at
 * build time by cmake/build-info.cmake. */

extern const char pa_version[];      /* the project's version, "0.1.0" */
extern const char pa_git_revision[]; /* short commit, "-dirty" when tracked files differ; "unknown" */
extern const char pa_build[];        /* compiler, build type, flags, backend */

#endif
