// cuda_nccl.cu: the collectives between the worker ranks' GPUs (backend.h's
// groups): a group is NCCL's communicator itself, its all-gather on the
// backend's stream, waited for. A build without NCCL has none (null
// operations: the ranks exchange through MPI instead).
#include "cuda_internal.cuh"

#ifdef PALIGN_HAVE_NCCL
#include <nccl.h>
#endif

#include <stdio.h>
#include <string.h>

namespace palign_cuda {

#ifdef PALIGN_HAVE_NCCL
static_assert(sizeof(ncclUniqueId) == kGroupIdBytes, "cuda_internal.cuh: kGroupIdBytes is not NCCL's");

namespace {

bool check_nccl(ncclResult_t r, const char *what) {
  if (r == ncclSuccess)
    return true;
  snprintf(last_error, sizeof last_error, "%s: %s", what, ncclGetErrorString(r));
  return false;
}

} // namespace

int cu_group_id(void *id) {
  ncclUniqueId u;
  if (!check_nccl(ncclGetUniqueId(&u), "ncclGetUniqueId"))
    return -1;
  memcpy(id, &u, sizeof u);
  return 0;
}

int cu_group_join(const void *id, int n, int rank, pa_group **out) {
  ncclUniqueId u;
  memcpy(&u, id, sizeof u);
  ncclComm_t comm;
  if (!check_nccl(ncclCommInitRank(&comm, n, u, rank), "ncclCommInitRank"))
    return -1;
  *out = (pa_group *)comm; // the group is NCCL's communicator itself
  return 0;
}

int cu_group_allgather(pa_group *g, const float *send, size_t count, float *recv) {
  int members = 0;
  if (!check_nccl(ncclCommCount((ncclComm_t)g, &members), "ncclCommCount"))
    return -1;
  {
    const timed t("NCCL all-gather", 0.0, 4.0 * count * members); // what each member receives
    if (!check_nccl(ncclAllGather(send, recv, count, ncclFloat, (ncclComm_t)g, stream), "ncclAllGather"))
      return -1;
  }
  if (!wait_stream("ncclAllGather"))
    return -1;
  return 0;
}

void cu_group_leave(pa_group *g) {
  if (g)
    ncclCommDestroy((ncclComm_t)g);
}

#endif

} // namespace palign_cuda
