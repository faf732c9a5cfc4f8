// nccl_emu.cc: the NCCL of cuda_emu.h, between processes on one machine, so
// that the CUDA backend's collectives (cuda_nccl.cu's cu_group_*) and the
// service's exchange of the activation bank over them (coordinator/service.c)
// run where no GPU is, with each worker a process on an emulated device.
//
// A group is a directory: ncclGetUniqueId names one (under $TMPDIR, else
// /tmp), and its id carries the name. Each member writes its files whole
// under a temporary name and renames them into place, so a file another
// member sees is complete:
//  - ncclCommInitRank writes member.RANK (the group's size, its device, the
//    host) and waits for every member's, as NCCL's does;
//  - the k-th ncclAllGather writes k.RANK (the bytes it sends) and reads
//    every member's k file into its place in recv; a member deletes its
//    k-1 file then, as every member has written its k file and so finished
//    the k-1 gather;
//  - ncclCommDestroy (or a failed ncclCommInitRank) writes left.RANK, and
//    the member that finds every member there left removes the directory
//    (renaming it first, so that one does).
// What NCCL would refuse or get wrong is an error here, with its detail on
// standard error: a rank outside the group, a member joining twice, members
// that disagree on the group's size, two members on one device of one host
// (NCCL's "duplicate GPU"), a buffer not in device memory or too small for
// the gather, send overlapping recv other than in place, and members
// giving different counts (on NCCL, a hang or wrong data). A member that
// waits over 10 minutes for the others fails with ncclSystemError (NCCL
// would wait for ever).
//
// It is not fast: every byte goes through a file. A gather runs when it is
// called, after the work its stream holds (as if the host had waited for
// the stream): a legal order of NCCL's, which queues it on the stream.
#include "cuda_emu.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <set>
#include <string>
#include <vector>

struct emu_nccl_comm {
  std::string dir;
  int n, rank;
  unsigned long gathers; // the collectives this member has run
};

namespace {

constexpr char kIdMagic[] = "palign-emu-nccl:";
constexpr double kWaitSeconds = 600;

std::set<ncclComm_t> &comms = *new std::set<ncclComm_t>; // as long as the process, as cuda_emu.cc's containers

size_t type_bytes(ncclDataType_t t) {
  switch (t) {
  case ncclInt8:
  case ncclUint8: return 1;
  case ncclFloat16:
  case ncclBfloat16: return 2;
  case ncclInt32:
  case ncclUint32:
  case ncclFloat32: return 4;
  case ncclInt64:
  case ncclUint64:
  case ncclFloat64: return 8;
  }
  return 0;
}

std::string file(const emu_nccl_comm *c, const std::string &name) { return c->dir + "/" + name; }

bool exists(const std::string &path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0;
}

// path's contents, a then b, written under another name and renamed into place.
bool put(const std::string &path, const void *a, size_t na, const void *b, size_t nb) {
  const std::string tmp = path + ".tmp";
  FILE *f = fopen(tmp.c_str(), "wb");
  bool ok = f && fwrite(a, 1, na, f) == na && (!nb || fwrite(b, 1, nb, f) == nb);
  ok = f && !fclose(f) && ok;
  if (!ok || rename(tmp.c_str(), path.c_str())) {
    emu::report("NCCL: cannot write %s: %s", path.c_str(), strerror(errno));
    unlink(tmp.c_str());
    return false;
  }
  return true;
}

// Waits until path exists; false (reported) after kWaitSeconds.
bool wait_for(const std::string &path, const char *what) {
  timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (long polls = 0; !exists(path); polls++) {
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (now.tv_sec - start.tv_sec + 1e-9 * (now.tv_nsec - start.tv_nsec) > kWaitSeconds) {
      emu::report("NCCL: %s: waited %.0f s for %s", what, kWaitSeconds, path.c_str());
      return false;
    }
    usleep(polls < 1000 ? 100 : 2000); // quick while the others are near, then gently
  }
  return true;
}

bool read_all(const std::string &path, std::vector<char> &out) {
  FILE *f = fopen(path.c_str(), "rb");
  out.clear();
  char buf[1 << 16];
  size_t got;
  while (f && (got = fread(buf, 1, sizeof buf, f)) > 0)
    out.insert(out.end(), buf, buf + got);
  const bool ok = f && !ferror(f);
  if (f)
    fclose(f);
  if (!ok)
    emu::report("NCCL: cannot read %s: %s", path.c_str(), strerror(errno));
  return ok;
}

void remove_tree(const std::string &dir) {
  if (DIR *d = opendir(dir.c_str())) {
    while (const dirent *e = readdir(d))
      if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
        unlink((dir + "/" + e->d_name).c_str());
    closedir(d);
  }
  if (rmdir(dir.c_str()))
    emu::report("NCCL: cannot remove %s: %s", dir.c_str(), strerror(errno));
}

// Whether every member whose file is in the group's directory has left it
// (the members there, not the group's size: members that disagreed on it
// leave too).
bool all_left(const std::string &dir) {
  DIR *d = opendir(dir.c_str());
  bool all = d != nullptr;
  while (const dirent *e = d ? readdir(d) : nullptr) {
    const char *member = strncmp(e->d_name, "member.", 7) ? nullptr : e->d_name + 7;
    if (member && (strchr(member, '.') || !exists(dir + "/left." + member))) // one still joining, or here
      all = false;
  }
  if (d)
    closedir(d);
  return all;
}

// This member is done with the group: the last to leave removes its directory.
void leave(const emu_nccl_comm *c) {
  const char mark = 1;
  if (!put(file(c, "left." + std::to_string(c->rank)), &mark, 1, nullptr, 0) || !all_left(c->dir))
    return;
  const std::string gone = c->dir + ".gone." + std::to_string(c->rank);
  if (rename(c->dir.c_str(), gone.c_str()) == 0) // only one member's rename finds the directory
    remove_tree(gone);
}

std::string host() {
  char h[256] = "";
  gethostname(h, sizeof h - 1);
  return h;
}

} // namespace

ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
  if (emu::pending_fault())
    return ncclUnhandledCudaError;
  unsigned char r[8];
  if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
    emu::report("NCCL: getrandom: %s", strerror(errno));
    return ncclSystemError;
  }
  const char *tmp = getenv("TMPDIR");
  char name[NCCL_UNIQUE_ID_BYTES];
  const int len = snprintf(name, sizeof name, "%s%s/palign-nccl-%02x%02x%02x%02x%02x%02x%02x%02x", kIdMagic,
                           tmp && *tmp ? tmp : "/tmp", r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]);
  if (len < 0 || len >= (int)sizeof name) {
    emu::report("NCCL: TMPDIR is too long for a group's directory in an id of %d bytes", NCCL_UNIQUE_ID_BYTES);
    return ncclSystemError;
  }
  memset(id->internal, 0, sizeof id->internal);
  memcpy(id->internal, name, (size_t)len);
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *out, int n, ncclUniqueId id, int rank) {
  *out = nullptr;
  if (emu::pending_fault())
    return ncclUnhandledCudaError;
  if (n < 1 || rank < 0 || rank >= n) {
    emu::report("ncclCommInitRank: rank %d of a group of %d", rank, n);
    return ncclInvalidArgument;
  }
  if (strncmp(id.internal, kIdMagic, sizeof kIdMagic - 1) || !memchr(id.internal, 0, sizeof id.internal)) {
    emu::report("ncclCommInitRank: the id is not one ncclGetUniqueId made");
    return ncclInvalidArgument;
  }
  auto *c = new emu_nccl_comm{id.internal + sizeof kIdMagic - 1, n, rank, 0};
  if (mkdir(c->dir.c_str(), 0700) && errno != EEXIST) {
    emu::report("NCCL: cannot make %s: %s", c->dir.c_str(), strerror(errno));
    delete c;
    return ncclSystemError;
  }
  const std::string mine = file(c, "member." + std::to_string(rank));
  if (exists(mine)) {
    emu::report("ncclCommInitRank: rank %d joined the group twice", rank);
    delete c;
    return ncclInvalidUsage;
  }
  const std::string me = std::to_string(n) + " " + std::to_string(emu::current_device()) + " " + host();
  if (!put(mine, me.data(), me.size(), nullptr, 0)) {
    delete c;
    return ncclSystemError;
  }
  ncclResult_t r = ncclSuccess;
  std::vector<char> other;
  for (int k = 0; k < n && r == ncclSuccess; k++) {
    const std::string path = file(c, "member." + std::to_string(k));
    if (!wait_for(path, "ncclCommInitRank") || !read_all(path, other)) {
      r = ncclSystemError;
      break;
    }
    other.push_back(0);
    int their_n = 0, their_device = -1, used = 0;
    sscanf(other.data(), "%d %d %n", &their_n, &their_device, &used);
    if (their_n != n) {
      emu::report("ncclCommInitRank: rank %d joined a group of %d, rank %d one of %d", k, their_n, rank, n);
      r = ncclInvalidUsage;
    } else if (k != rank && their_device == emu::current_device() && used && host() == other.data() + used) {
      emu::report("ncclCommInitRank: duplicate GPU: ranks %d and %d both on device %d of %s", k, rank, their_device,
                  host().c_str());
      r = ncclInvalidUsage;
    }
  }
  if (r != ncclSuccess) {
    leave(c);
    delete c;
    return r;
  }
  comms.insert(c);
  *out = c;
  return ncclSuccess;
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t type, ncclComm_t c,
                           cudaStream_t s) {
  if (emu::pending_fault())
    return ncclUnhandledCudaError;
  if (!comms.count(c)) {
    emu::report("ncclAllGather: %p is not a communicator ncclCommInitRank made, or it was destroyed", (void *)c);
    return ncclInvalidArgument;
  }
  const size_t size = type_bytes(type), bytes = count * size;
  if (!size || !emu::stream_valid(s)) {
    emu::report("ncclAllGather: %s", !size ? "no such data type" : "the stream was not created or is destroyed");
    return ncclInvalidArgument;
  }
  if (!emu::device_range(send, bytes) || !emu::device_range(recv, bytes * c->n)) {
    emu::report("ncclAllGather: send (%p) must be %zu bytes of device memory and recv (%p) %zu", send, bytes, recv,
                bytes * c->n);
    return ncclInvalidArgument;
  }
  emu::run_queued(); // what computes send, before it is sent
  if (emu::pending_fault())
    return ncclUnhandledCudaError;
  const char *in = static_cast<const char *>(send);
  char *to = static_cast<char *>(recv);
  if (in + bytes > to && in < to + bytes * c->n && in != to + bytes * c->rank) {
    emu::report("ncclAllGather: send overlaps recv other than at this rank's place (in place)");
    return ncclInvalidArgument;
  }
  const unsigned long k = c->gathers;
  const uint64_t header = bytes;
  if (!put(file(c, std::to_string(k) + "." + std::to_string(c->rank)), &header, sizeof header, in, bytes))
    return ncclSystemError;
  std::vector<char> got;
  for (int r = 0; r < c->n; r++) {
    const std::string path = file(c, std::to_string(k) + "." + std::to_string(r));
    if (!wait_for(path, "ncclAllGather") || !read_all(path, got))
      return ncclSystemError;
    uint64_t theirs = 0;
    if (got.size() >= sizeof theirs)
      memcpy(&theirs, got.data(), sizeof theirs);
    if (got.size() != sizeof theirs + theirs || theirs != bytes) {
      emu::report("ncclAllGather: rank %d sent %llu bytes, rank %d %zu (every member must give the same count)", r,
                  (unsigned long long)theirs, c->rank, bytes);
      return ncclInvalidUsage;
    }
    memmove(to + bytes * r, got.data() + sizeof theirs, bytes);
  }
  if (k > 0)
    unlink(file(c, std::to_string(k - 1) + "." + std::to_string(c->rank)).c_str());
  c->gathers = k + 1;
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t c, int *count) {
  if (!comms.count(c)) {
    emu::report("ncclCommCount: %p is not a communicator ncclCommInitRank made, or it was destroyed", (void *)c);
    return ncclInvalidArgument;
  }
  *count = c->n;
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t c) {
  if (!comms.erase(c)) {
    emu::report("ncclCommDestroy: %p is not a communicator ncclCommInitRank made, or it was destroyed", (void *)c);
    return ncclInvalidArgument;
  }
  leave(c);
  delete c;
  return ncclSuccess;
}

const char *ncclGetErrorString(ncclResult_t r) {
  switch (r) {
  case ncclSuccess: return "no error";
  case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
  case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
  case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
  case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
  case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
  }
  return "unknown result code";
}
