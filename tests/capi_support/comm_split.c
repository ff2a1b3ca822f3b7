/* hetcclCommSplit from C, on every rank of a job started with torchrun's variables:
 *
 *   1. by parity, keys reversing the order: each new communicator's size, this rank's
 *      place in it, and a sum over exactly its members;
 *   2. rank 0 passes HETCCL_SPLIT_NOCOLOR and gets NULL; the others form one;
 *   3. the last rank passes a bad colour (-5): it gets hetcclInvalidArgument naming
 *      it, while the others (who passed 0) get their communicator without waiting;
 *   4. the same with rank 0 passing NULL for the result.
 *
 * The parent is destroyed before its children, which go on working.
 * Prints "rank R of N: K split checks passed"; exits non-zero on the first wrong value. */
#include <hetccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int rank, nranks;
static int checks;

#define CHECK(call)                                                                   \
  do {                                                                                \
    hetcclResult_t r_ = (call);                                                       \
    if (r_ != hetcclSuccess) {                                                        \
      fprintf(stderr, "rank %d: %s failed: %s\n", rank, #call, hetcclGetLastError(NULL)); \
      exit(2);                                                                        \
    }                                                                                 \
  } while (0)

static void expect_int(const char* what, long got, long want) {
  if (got != want) {
    fprintf(stderr, "rank %d: %s is %ld, expected %ld\n", rank, what, got, want);
    exit(1);
  }
  checks++;
}

/* `members` lists the parent ranks of `comm` in their new order. */
static void check_member(const char* what, hetcclComm_t comm, const int* members, int n) {
  int size = -1, me = -1, want_me = -1;
  for (int i = 0; i < n; i++)
    if (members[i] == rank) want_me = i;
  CHECK(hetcclCommCount(comm, &size));
  CHECK(hetcclCommUserRank(comm, &me));
  expect_int(what, size, n);
  expect_int(what, me, want_me);
  int32_t sum[5];
  for (int i = 0; i < 5; i++) sum[i] = rank + 1 + i;
  CHECK(hetcclAllReduce(sum, sum, 5, hetcclInt32, hetcclSum, comm, NULL));
  long want = 0;
  for (int i = 0; i < n; i++) want += members[i] + 1;
  for (int i = 0; i < 5; i++) expect_int(what, sum[i], want + (long)n * i);
}

int main(void) {
  hetcclComm_t world = NULL, parity = NULL, rest = NULL, third = NULL;
  CHECK(hetcclCommInitFromEnv(&world));
  CHECK(hetcclCommUserRank(world, &rank));
  CHECK(hetcclCommCount(world, &nranks));
  int* members = malloc(sizeof(int) * (size_t)nranks);

  CHECK(hetcclCommSplit(world, rank % 2, -rank, &parity));
  int n = 0;
  for (int r = nranks - 1; r >= 0; r--)
    if (r % 2 == rank % 2) members[n++] = r;
  check_member("parity split", parity, members, n);

  rest = world; /* any non-NULL value: rank 0 must get NULL back */
  CHECK(hetcclCommSplit(world, rank == 0 ? HETCCL_SPLIT_NOCOLOR : 0, 0, &rest));
  if (rank == 0) {
    expect_int("no-colour split gives NULL", rest == NULL, 1);
  } else {
    for (int r = 1; r < nranks; r++) members[r - 1] = r;
    check_member("split without rank 0", rest, members, nranks - 1);
  }

  int last = nranks - 1;
  hetcclResult_t res = hetcclCommSplit(world, rank == last ? -5 : 0, 0, &third);
  if (rank == last) {
    expect_int("bad colour result", res, hetcclInvalidArgument);
    const char* why = hetcclGetLastError(NULL);
    expect_int("bad colour named", strstr(why, "color is -5") != NULL, 1);
    expect_int("bad colour gives no communicator", third == NULL, 1);
  } else {
    CHECK(res);
    for (int r = 0; r < last; r++) members[r] = r;
    check_member("split around a bad colour", third, members, last);
  }

  /* Rank 0 passes no place for the result: it fails alone, the others carry on. */
  hetcclComm_t fourth = NULL;
  res = hetcclCommSplit(world, 0, 0, rank == 0 ? NULL : &fourth);
  if (rank == 0) {
    expect_int("NULL newcomm result", res, hetcclInvalidArgument);
    expect_int("NULL newcomm named", strstr(hetcclGetLastError(NULL), "newcomm is NULL") != NULL, 1);
  } else {
    CHECK(res);
    for (int r = 1; r < nranks; r++) members[r - 1] = r;
    check_member("split around a NULL newcomm", fourth, members, nranks - 1);
    CHECK(hetcclCommDestroy(fourth));
  }

  CHECK(hetcclCommDestroy(world));
  for (int r = nranks - 1, k = 0; r >= 0; r--)
    if (r % 2 == rank % 2) members[k++] = r;
  check_member("parity split after the parent is gone", parity, members, n);
  CHECK(hetcclCommDestroy(parity));
  if (rest) CHECK(hetcclCommDestroy(rest));
  if (third) CHECK(hetcclCommDestroy(third));
  printf("rank %d of %d: %d split checks passed\n", rank, nranks, checks);
  free(members);
  return 0;
}
