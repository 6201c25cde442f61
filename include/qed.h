/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * libqed: QEMU's QED disk-image format, as a C library.
 *
 * Conventions (every function below follows them):
 * - Errors: functions return 0 (or a documented non-negative count) on success and a negative
 *   errno on failure: -EINVAL for bad arguments and invalid images, -ENOTSUP for unsupported
 *   features, -EIO for corrupt metadata, -EROFS for writes to read-only images, -EAGAIN when
 *   another process holds the image's lock, -EBUSY when another handle of this process has it
 *   open in a conflicting mode, -ECANCELED when a progress callback stopped a long operation. qed_last_error() then returns a message naming the
 *   function and what was wrong (the header field and its value, the argument); it is per
 *   thread, never NULL, and valid until the thread's next qed_ call. qed_strerror() gives
 *   static text for any errno value.
 * - Out-parameters are written only on success.
 * - Ownership: strings and buffers passed in are borrowed for the duration of the call. A
 *   qed_image handle from qed_open*() must eventually be released with qed_close(), which frees
 *   it even when it returns an error.
 * - NULL: every pointer argument is checked; NULL gives -EINVAL unless the function says it is
 *   allowed. A buffer may be NULL when its length is 0.
 * - Threads: every call on a qed_image except qed_close() may run concurrently from any number
 *   of threads. qed_close() must be the last call on a handle and must not overlap any other.
 * - Panics: no Rust panic crosses this interface; an internal error returns -EIO with an
 *   "internal error" message.
 *
 * Structs that grow: every struct passed to or filled by the library (qed_open_options,
 * qed_create_options, qed_aio_options, qed_io_ops, qed_info, qed_extent, qed_check_result, ...)
 * begins with `uint32_t struct_size`, which the caller sets to sizeof the struct as this header
 * declares it; QED_INIT(type) gives a zeroed struct with it set:
 *     qed_info info = QED_INIT(qed_info);
 * New fields are only ever appended, in later releases, after the old struct's last byte
 * (never in its tail padding, which an old program may leave uninitialised). A program built against an older
 * header passes a smaller struct_size and keeps working: the library reads only the fields it
 * was given (the others take their defaults, as if zero) and fills only the fields it was
 * given. A program built against a newer header, run with an older library, gets -ENOTSUP
 * from a call whose input struct sets a field the library does not know (zero fields are
 * fine), and finds the output fields the library does not know untouched (zero-initialise to
 * tell). A struct_size that is not a multiple of 4 from 8 to 4096 is refused with -EINVAL.
 * Handles (qed_image) are opaque and grow freely.
 *
 * Versions and symbols: libqed.so.0 is the SONAME of every 0.x release. Each release adds its
 * new functions in its own symbol version node (QED_0.1, QED_0.2, ...) and never changes or
 * removes a published function, struct field or constant; a change that must break binaries
 * bumps the SONAME (libqed.so.1), and CI's ABI check (abidiff against abi/) fails on any break
 * the SONAME does not announce. qed_version() and QED_VERSION_* give the version.
 *
 * Fork, exec and signals: file descriptors the library opens are close-on-exec. Threads the
 * library starts (the asynchronous queue's workers, the write-back timer) block every signal,
 * so signals go to the application's threads. After fork(), the child must not use or close
 * any qed_image inherited from the parent: library threads do not exist in the child, and
 * the image file's locks are shared with the parent's descriptors until the child execs or
 * exits. The child may open images of its own (not ones the parent holds read-write).
 *
 * Durability and storage failures:
 * - A write that completed before a flush (qed_flush, qed_aio_flush) completed successfully
 *   survives a power loss or a crash at any point; a write after it reads back afterwards as
 *   its old or its new bytes, never anything else.
 * - Process death (kill -9, a crash of the caller): an image without a backing file keeps
 *   every write that completed, flushed or not, as QEMU does (new table entries are written
 *   with the write; the kernel holds them). An image with a backing file must flush data
 *   before the table entry that maps it, so new entries wait in memory for the next flush or
 *   at most one second (qed_open_options.writeback_delay_ms), whichever is first: a killed
 *   process loses at most the allocating writes of that last second that were not flushed.
 *   Writes into clusters already allocated are never lost.
 * - A failed write or read returns its errno (-EIO, -ENOSPC, ...) and the handle goes on: a
 *   full disk is not fatal, retry once there is room.
 * - A failed flush, or a failed write of metadata (table entries, header), is fatal for the
 *   handle, as in QEMU and PostgreSQL: after a failed fsync the kernel may have dropped the
 *   dirty pages, so a later flush that succeeds would prove nothing. Every later call on the
 *   handle returns -EIO and qed_last_error() names the first failure; nothing more is written
 *   and nothing is reported durable. qed_close() frees the handle and returns -EIO; it leaves
 *   the image's need-check bit set, and the next read-write open repairs it (keeping
 *   everything that was flushed before the failure).
 * - A failed qed_open() never writes after the failure: the file is left as it was, or, if
 *   the failure came in the middle of the repair of a dirty image, as the repair left it
 *   (repairs are ordered so that any prefix of them is safe). A repair that cannot read all
 *   the tables reclaims nothing (an unreadable table may map any cluster) and fails the open.
 *
 * Backing files and security: a backing file name is taken from the image header and opened
 * read-only, relative to the image's folder unless absolute. It is always a plain path: names
 * with a protocol prefix (json:, nbd:, file:, ...) are refused with -ENOTSUP, as are chains
 * deeper than 16 images and loops. By default any path is followed, as QEMU does, so that
 * images whose base lives in another folder keep working. An image from a stranger can name
 * any host file (/etc/passwd, a disk device) and expose it to the guest: open such images with
 * QED_OPEN_CONFINE_BACKING (the chain must stay inside the image's folder; -EACCES otherwise)
 * or QED_OPEN_NO_BACKING, and inspect qed_get_backing_file() first.
 */

#ifndef QED_H
#define QED_H

/* Generated by cbindgen from src/capi; do not edit. Regenerate with:
 * cbindgen --config cbindgen.toml --output include/qed.h */

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

/* A zeroed struct of `type` with its struct_size set (see "Structs that grow"). C99 and later;
 * in C++ write `type v{}; v.struct_size = sizeof v;`. */
#define QED_INIT(type) ((type){.struct_size = sizeof(type)})

/**
 * Most requests one queue may hold.
 */
#define MAX_QUEUE_DEPTH (1 << 20)

/**
 * Most pool threads an engine may have.
 */
#define MAX_THREADS 1024

/**
 * `qed_aio_options.flags`: deliver completions on the caller's event loop (`qed_aio_get_fd`,
 * `qed_aio_poll`) instead of on library threads. A read of up to 256 KiB whose data is in the
 * page cache (and whose L2 entries are cached) is done during the submit, on the caller's
 * thread, like an io_uring page-cache hit; its callback still runs only in `qed_aio_poll`.
 * `qed_aio_poll` runs the completions that were ready when it started, not those that its
 * callbacks cause.
 */
#define QED_AIO_EVENT_LOOP 1

/**
 * `qed_aio_options.flags`: when the queue is full, a submit waits for room instead of returning
 * `-EAGAIN`. (Never inside a completion callback of the same image: there it returns -EAGAIN.)
 */
#define QED_AIO_BLOCK_WHEN_FULL 2

/**
 * Reclaim leaked clusters (truncating leaked clusters at the end of the file).
 */
#define QED_FIX_LEAKS 1

/**
 * Repair corrupt table entries.
 */
#define QED_FIX_ERRORS 2

/**
 * Log level: the handle failed, a storage call failed.
 */
#define QED_LOG_ERROR 1

/**
 * Log level: something was refused (a hostile header field) or left unrepaired.
 */
#define QED_LOG_WARN 2

/**
 * Log level: opens, closes, checks and repairs.
 */
#define QED_LOG_INFO 3

/**
 * Log level: allocations of clusters and L2 tables, flushes, write-backs of staged entries.
 */
#define QED_LOG_DEBUG 4

/**
 * Log level: per-piece detail (L2 cache misses, table writes, file extensions).
 */
#define QED_LOG_TRACE 5

/**
 * `qed_engine_options.backend`, `qed_engine_stats.backend`: io_uring where the kernel allows
 * it, the thread pool otherwise (the default; the environment variable `QED_IO_ENGINE`,
 * `threads` or `io_uring`, chooses for the process's engine).
 */
#define QED_IO_BACKEND_AUTO 0

/**
 * The thread pool: each request runs on a pool thread with `preadv`/`pwritev`.
 */
#define QED_IO_BACKEND_THREADS 1

/**
 * io_uring for reads and in-place writes (Linux); `qed_engine_new` fails with the kernel's
 * error where io_uring is not available.
 */
#define QED_IO_BACKEND_IO_URING 2

/**
 * Open the image read-write (the default is read-only).
 */
#define QED_OPEN_RDWR 1

/**
 * Do not open the backing file: unallocated clusters read as zeros.
 */
#define QED_OPEN_NO_BACKING 2

/**
 * For check tools: do not check and repair an image whose need-check bit is set.
 */
#define QED_OPEN_CHECK 4

/**
 * Use O_DIRECT for the image file.
 */
#define QED_OPEN_DIRECT 8

/**
 * Read-only opens: share the image with a writer (QEMU's force-share, `-U`).
 */
#define QED_OPEN_FORCE_SHARE 16

/**
 * Do not take QEMU-compatible advisory locks on the image file.
 */
#define QED_OPEN_NO_LOCK 32

/**
 * Confine the backing chain to regular files inside the folder of the image being opened (and
 * its subfolders); anything else is refused with -EACCES. Use it, or `QED_OPEN_NO_BACKING`,
 * for images from untrusted sources (see "Backing files and security" at the top).
 */
#define QED_OPEN_CONFINE_BACKING 64

/**
 * Read-write opens only (refused with -EINVAL otherwise): a read served by the backing file
 * also copies the clusters it touches into the image (QEMU's copy-on-read). A guest write
 * always wins over the copy; a copy that fails fails the read, as in QEMU.
 */
#define QED_OPEN_COPY_ON_READ 128

/**
 * The range is not allocated in this image: it reads from the backing file, or as zeros.
 * With `QED_BLOCK_STATUS_CHAIN`: no image of the chain stores it, so it reads as zeros.
 */
#define QED_BLOCK_UNALLOCATED 0

/**
 * The range is allocated data at `host_offset` in the image file (with
 * `QED_BLOCK_STATUS_CHAIN`: in the file of the image at `depth`, a QED image or a raw file).
 */
#define QED_BLOCK_DATA 1

/**
 * The range is made of zero clusters: it reads as zeros whatever the backing file holds.
 * With `QED_BLOCK_STATUS_CHAIN` also a hole in a raw backing file (`host_offset` then gives
 * its offset in that file, with `QED_EXTENT_OFFSET_VALID`).
 */
#define QED_BLOCK_ZERO 2

/**
 * `qed_extent.flags`: `host_offset` is an offset in the file of the image at `depth` (set for
 * data, and for holes of a raw backing file).
 */
#define QED_EXTENT_OFFSET_VALID 1

/**
 * `qed_block_status_ext` flag: answer through the backing chain (the chain opened with the
 * image; no file is opened): data or zeros at the depth that decides the range, or
 * unallocated in every image of the chain.
 */
#define QED_BLOCK_STATUS_CHAIN 1

/**
 * Request flag of `qed_write_flags`, `qed_writev_flags` and their `qed_aio_` forms: force unit
 * access. The write completes only once it is durable, with the table entries that lead to
 * it, as if a `qed_flush` followed it (NBD's FUA flag, QEMU's `BDRV_REQ_FUA`).
 */
#define QED_REQ_FUA 1

/**
 * Flag of `qed_write_zeroes_flags` and `qed_aio_write_zeroes_flags`: whole allocated clusters
 * may give their space back to the host file system (a hole is punched; the cluster keeps its
 * table entry and reads as zeros) instead of being overwritten with zeros (QEMU's
 * `BDRV_REQ_MAY_UNMAP`; NBD without `NBD_CMD_FLAG_NO_HOLE`).
 */
#define QED_ZERO_MAY_UNMAP 1

/**
 * Flag of `qed_write_zeroes_flags` and `qed_aio_write_zeroes_flags`: fail with `-ENOTSUP`,
 * changing nothing, instead of writing zero bytes anywhere (a partial cluster that does not
 * already read as zeros, or an allocated cluster without `QED_ZERO_MAY_UNMAP` or on storage
 * that cannot punch holes): QEMU's `BDRV_REQ_NO_FALLBACK`, NBD's `NBD_CMD_FLAG_FAST_ZERO`.
 */
#define QED_ZERO_NO_FALLBACK 2

/**
 * `qed_open_options.writeback_delay_ms`: write staged table entries back only at flush and
 * close, never by timer.
 */
#define QED_WRITEBACK_AT_FLUSH UINT32_MAX

/**
 * `qed_open_options.need_check_delay_ms`: no idle timer; the need-check bit is cleared only at
 * close, by `qed_settle` and by `qed_aio_drain`.
 */
#define QED_NEED_CHECK_AT_CLOSE UINT32_MAX

/**
 * Major version of this library.
 */
#define QED_VERSION_MAJOR 0

/**
 * Minor version of this library.
 */
#define QED_VERSION_MINOR 2

/**
 * Patch version of this library.
 */
#define QED_VERSION_PATCH 0

/**
 * Per-request flags of a write (the block layer's request flags).
 */
typedef struct WriteFlags WriteFlags;

/**
 * An I/O engine: a bounded pool of threads (and, with io_uring, one ring thread) that runs
 * the asynchronous requests of every image opened with it. Opaque to C.
 */
typedef struct qed_engine qed_engine;

/**
 * An open image. Opaque to C.
 */
typedef struct qed_image qed_image;

/**
 * Settings of an image's asynchronous queue. Zero-initialised fields take the defaults; set
 * `struct_size` first (see "Structs that grow" at the top).
 */
typedef struct qed_aio_options {
  /**
   * `sizeof(struct qed_aio_options)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * At most this many of the image's requests run on the engine's pool threads at once (0:
   * as many as the engine has; more than the engine has is the same; more than 1024 is
   * refused with -EINVAL). The threads belong to the engine (`qed_open_options.engine`,
   * by default the process's), shared by every image, not to the image.
   */
  uint32_t workers;
  /**
   * Requests queued or in flight at most (0: 1024; more than 1048576 is refused).
   */
  uint32_t queue_depth;
  /**
   * `QED_AIO_EVENT_LOOP`, `QED_AIO_BLOCK_WHEN_FULL`.
   */
  unsigned int flags;
} qed_aio_options;

/**
 * Completion callback of the asynchronous entry points: `ret` is 0 or a negative errno.
 */
typedef void (*qed_completion_fn)(void *opaque, int ret);

/**
 * What `qed_check` found and repaired, with QEMU's fields. Set `struct_size` first (see
 * "Structs that grow" at the top).
 */
typedef struct qed_check_result {
  /**
   * `sizeof(struct qed_check_result)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * Corruptions found and not repaired.
   */
  uint64_t corruptions;
  /**
   * Leaked clusters not reclaimed.
   */
  uint64_t leaks;
  /**
   * Errors that kept the check from completing.
   */
  uint64_t check_errors;
  /**
   * Corruptions repaired.
   */
  uint64_t corruptions_fixed;
  /**
   * Leaked clusters reclaimed.
   */
  uint64_t leaks_fixed;
  /**
   * Data clusters in use.
   */
  uint64_t allocated_clusters;
  /**
   * Clusters of the virtual disk.
   */
  uint64_t total_clusters;
  /**
   * Data clusters not directly after the previous one.
   */
  uint64_t fragmented_clusters;
  /**
   * File length after the check.
   */
  uint64_t image_end_offset;
} qed_check_result;

/**
 * Called by a long operation with how far it got: `done` of `total` (bytes for copies,
 * clusters for checks; `done` never decreases). Return 0 to go on, anything else to stop the
 * operation, which then returns `-ECANCELED` with everything it did left consistent. Called on
 * the thread that called the operation, at least at the start and at the end.
 */
typedef int (*qed_progress_fn)(void *opaque, uint64_t done, uint64_t total);

/**
 * A progress callback for long operations. Set `struct_size` first (see "Structs that grow"
 * at the top); passing NULL where a `const qed_progress *` is taken means no reports and no
 * cancellation.
 */
typedef struct qed_progress {
  /**
   * `sizeof(struct qed_progress)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * The callback; NULL for none.
   */
  qed_progress_fn progress;
  /**
   * Passed to `progress` unchanged.
   */
  void *opaque;
} qed_progress;

/**
 * How to create an image. Zero-initialised fields take the defaults; set `struct_size` first
 * (see "Structs that grow" at the top).
 */
typedef struct qed_create_options {
  /**
   * `sizeof(struct qed_create_options)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * Cluster size in bytes: a power of two from 4096 to 64 MiB; 0 means 65536.
   */
  uint32_t cluster_size;
  /**
   * Virtual size in bytes, a multiple of 512; 0 with a backing file takes its size.
   */
  uint64_t size;
  /**
   * Table size in clusters: a power of two from 1 to 16; 0 means 4.
   */
  uint32_t table_size;
  /**
   * Backing file name, stored as given (relative names resolve against the image's folder);
   * NULL for none.
   */
  const char *backing_file;
  /**
   * `"raw"` or `"qed"`; NULL lets the format be probed at open.
   */
  const char *backing_format;
} qed_create_options;

/**
 * Receives one report: `level` is one of `QED_LOG_ERROR` .. `QED_LOG_TRACE`, `msg` a line of
 * text without a newline that names the image file, valid only during the call.
 */
typedef void (*qed_log_fn)(void *opaque, int level, const char *msg);

/**
 * Counters of what an image handle did since it was opened (filled by `qed_get_stats`).
 * Set `struct_size` to `sizeof(struct qed_stats)` first (see "Structs that grow" at the top).
 * Each counter is read on its own, so a snapshot taken under load may mix moments.
 */
typedef struct qed_stats {
  /**
   * `sizeof(struct qed_stats)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * Written as 0.
   */
  uint32_t reserved;
  /**
   * Read requests that completed.
   */
  uint64_t read_requests;
  /**
   * Bytes those reads returned.
   */
  uint64_t read_bytes;
  /**
   * Write requests that completed.
   */
  uint64_t write_requests;
  /**
   * Bytes those writes carried.
   */
  uint64_t write_bytes;
  /**
   * Write-zeroes requests that completed.
   */
  uint64_t write_zeroes_requests;
  /**
   * Bytes those requests zeroed.
   */
  uint64_t write_zeroes_bytes;
  /**
   * Flush requests that completed.
   */
  uint64_t flush_requests;
  /**
   * Requests (read, write, write zeroes, discard, flush; synchronous or not) that returned an
   * error.
   */
  uint64_t failed_requests;
  /**
   * Flushes of the image file (by requests, write-back, close and the repair at open;
   * concurrent flush requests share one). A check's own flushes are not counted.
   */
  uint64_t storage_flushes;
  /**
   * Data clusters allocated.
   */
  uint64_t clusters_allocated;
  /**
   * L2 tables allocated.
   */
  uint64_t l2_tables_allocated;
  /**
   * Lookups that found their 4 KiB piece of L2 table in the cache.
   */
  uint64_t l2_cache_hits;
  /**
   * Lookups that read their piece of L2 table from the file.
   */
  uint64_t l2_cache_misses;
  /**
   * Pieces of L2 table written to the file.
   */
  uint64_t l2_writes;
  /**
   * Repairs run: at open (need-check bit set) and by `qed_check` with a fix.
   */
  uint64_t repairs;
  /**
   * Corruptions those repairs fixed.
   */
  uint64_t corruptions_fixed;
  /**
   * Leaked clusters those repairs reclaimed.
   */
  uint64_t leaks_fixed;
  /**
   * Discard requests that completed (synchronous or not).
   */
  uint64_t discard_requests;
  /**
   * Bytes those requests discarded.
   */
  uint64_t discard_bytes;
  /**
   * Data clusters whose space was given back to the host file system (discard,
   * write-zeroes with `QED_ZERO_MAY_UNMAP`).
   */
  uint64_t clusters_punched;
} qed_stats;

/**
 * How to build an engine (`qed_engine_new`). Zero-initialised fields take the defaults; set
 * `struct_size` first (see "Structs that grow" at the top).
 */
typedef struct qed_engine_options {
  /**
   * `sizeof(struct qed_engine_options)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * Pool threads at most (0: twice the CPUs plus four, at most 64; at most 1024).
   */
  uint32_t threads;
  /**
   * `QED_IO_BACKEND_*`.
   */
  unsigned int backend;
} qed_engine_options;

/**
 * What an engine is and has done (`qed_engine_get_stats`). Set `struct_size` first.
 */
typedef struct qed_engine_stats {
  /**
   * `sizeof(struct qed_engine_stats)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * `QED_IO_BACKEND_THREADS` or `QED_IO_BACKEND_IO_URING`: the one in use.
   */
  unsigned int backend;
  /**
   * Pool threads at most.
   */
  uint32_t max_threads;
  /**
   * Pool threads running now.
   */
  uint32_t threads;
  /**
   * Requests the io_uring ring did itself.
   */
  uint64_t ring_requests;
  /**
   * Requests pool threads ran.
   */
  uint64_t pool_requests;
} qed_engine_stats;

/**
 * Approves a backing file before it is opened (`qed_open_options.backing_approve`). `path` is
 * the file's canonical path (symbolic links resolved), `name` the name the header stores,
 * `depth` 1 for the image's own backing file, 2 for that file's backing file, and so on. Return
 * 0 to open it, or a negative errno to refuse: the open then fails with -EACCES and
 * `qed_last_error()` names the file. Called on the thread that opens, during the open only;
 * the strings are valid for the call only. It must not call libqed on the image being opened.
 */
typedef int (*qed_backing_approve_fn)(void *opaque, const char *path, const char *name, unsigned int depth);

/**
 * How to open an image (`qed_open_ext`, `qed_open_with_io`). Zero-initialised fields take the
 * defaults; set `struct_size` first (see "Structs that grow" at the top).
 */
typedef struct qed_open_options {
  /**
   * `sizeof(struct qed_open_options)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * `QED_OPEN_*` flags: read-write, O_DIRECT, locking (`QED_OPEN_NO_LOCK`,
   * `QED_OPEN_FORCE_SHARE`), backing-file policy.
   */
  unsigned int flags;
  /**
   * Byte budget of the L2 table cache (0: 128 MiB, which maps 1 TiB at the default geometry).
   */
  uint64_t l2_cache_size;
  /**
   * Longest backing chain accepted (0: 16).
   */
  uint32_t max_backing_depth;
  /**
   * Images with a backing file: milliseconds after which staged table entries are written
   * back by a library thread if no flush came first (0: 1000; `QED_WRITEBACK_AT_FLUSH`: only
   * at flush and close). It bounds what a killed process loses (see "Durability").
   */
  uint32_t writeback_delay_ms;
  /**
   * Called for each backing file of the chain before it is opened; NULL approves all
   * (within `flags`' policy). Not called on images opened with `qed_open_with_io`, which
   * open no backing file.
   */
  qed_backing_approve_fn backing_approve;
  /**
   * Passed to `backing_approve`.
   */
  void *backing_approve_opaque;
  /**
   * Settings of the image's asynchronous queue, started at open when not NULL (else the
   * first `qed_aio_*` call starts one with the defaults). Copied during the call.
   */
  const struct qed_aio_options *aio;
  /**
   * The engine that runs this image's asynchronous requests (NULL: the process's engine,
   * see `qed_engine_global`). The image keeps its own reference: the caller may free its
   * `qed_engine` at any time.
   */
  const struct qed_engine *engine;
  /**
   * Read-write opens: milliseconds without metadata updates (allocations, new zero
   * clusters) after which a library thread writes everything back and clears the
   * need-check bit, so a host that dies while the guest idles leaves a clean image (0: 5000,
   * as QEMU; `QED_NEED_CHECK_AT_CLOSE`: only at close, `qed_settle` and `qed_aio_drain`).
   */
  uint32_t need_check_delay_ms;
} qed_open_options;

/**
 * Information about an open image (filled by `qed_get_info`). Set `struct_size` first (see
 * "Structs that grow" at the top).
 */
typedef struct qed_info {
  /**
   * `sizeof(struct qed_info)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * Cluster size in bytes.
   */
  uint32_t cluster_size;
  /**
   * Virtual disk size in bytes.
   */
  uint64_t virtual_size;
  /**
   * L1/L2 table size in clusters.
   */
  uint32_t table_size;
  /**
   * Header size in clusters.
   */
  uint32_t header_size;
  /**
   * Incompatible feature bits as stored in the header.
   */
  uint64_t features;
  /**
   * Compatible feature bits.
   */
  uint64_t compat_features;
  /**
   * Autoclear feature bits.
   */
  uint64_t autoclear_features;
  /**
   * Length of the image file in bytes.
   */
  uint64_t file_size;
  /**
   * File offset of the L1 table.
   */
  uint64_t l1_table_offset;
  /**
   * 1 if the image is open read-write.
   */
  uint32_t writable;
  /**
   * 1 if the need-check (dirty) bit is set.
   */
  uint32_t needs_check;
  /**
   * 1 if the header names a backing file (see `qed_get_backing_file`).
   */
  uint32_t has_backing_file;
} qed_info;

/**
 * One extent reported by `qed_block_status` and `qed_block_status_ext`. Set `struct_size`
 * first; a caller built with the 0.1 header (32 bytes, no `depth` and `flags`) gets the
 * fields it has.
 */
typedef struct qed_extent {
  /**
   * `sizeof(struct qed_extent)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * `QED_BLOCK_DATA`, `QED_BLOCK_ZERO` or `QED_BLOCK_UNALLOCATED`.
   */
  unsigned int status;
  /**
   * Guest offset of the extent (the offset asked for).
   */
  uint64_t offset;
  /**
   * Length in bytes (at most the length asked for).
   */
  uint64_t length;
  /**
   * File offset of the first byte for `QED_BLOCK_DATA`, else 0 (see `flags`).
   */
  uint64_t host_offset;
  /**
   * The image that decides the range: 0 this image, 1 its backing file, and so on (0
   * without `QED_BLOCK_STATUS_CHAIN`). Added in 0.2.
   */
  uint32_t depth;
  /**
   * `QED_EXTENT_OFFSET_VALID` or 0. Added in 0.2.
   */
  uint32_t flags;
} qed_extent;

/**
 * Callbacks through which the library reaches caller-provided storage. Each returns 0 or a
 * negative errno. **They may be called from several library threads at once**, with the same
 * `opaque`. Set `struct_size` first (see "Structs that grow" at the top).
 */
typedef struct qed_io_ops {
  /**
   * `sizeof(struct qed_io_ops)`, set by the caller.
   */
  uint32_t struct_size;
  /**
   * Read `len` bytes at `offset` into `buf`; bytes past the end must read as zeros.
   */
  int (*pread)(void *opaque, void *buf, size_t len, uint64_t offset);
  /**
   * Write `len` bytes from `buf` at `offset`, growing the storage if needed.
   */
  int (*pwrite)(void *opaque, const void *buf, size_t len, uint64_t offset);
  /**
   * Make every completed write durable.
   */
  int (*flush)(void *opaque);
  /**
   * Store the current length in bytes in `*len`.
   */
  int (*get_length)(void *opaque, uint64_t *len);
  /**
   * Set the length (growing reads as zeros).
   */
  int (*set_length)(void *opaque, uint64_t len);
  /**
   * Optional: called once, after the last other callback, when the image is closed (or when
   * `qed_open_with_io` fails after taking the table).
   */
  void (*release)(void *opaque);
} qed_io_ops;



































#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

/**
 * Sets up the image's asynchronous queue (optional: the first `qed_aio_*` submit starts one
 * with the defaults). Replaces an existing queue after draining it.
 *
 * Callbacks should return promptly and must not wait for another request of the same image
 * to complete: a request submitted from inside a callback may run on that callback's own
 * worker once the callback has returned.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or unknown flags; `-EDEADLK` inside a
 * completion callback of this image.
 *
 * **Ownership:** `opts` is copied.
 *
 * **Thread-safety:** must not run concurrently with submits on the same image.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid; `img` a live handle.
 */
int qed_aio_setup(struct qed_image *img, const struct qed_aio_options *opts);

/**
 * Reads `len` bytes at guest `offset` into `buf`; `cb(opaque, ret)` runs once when done.
 *
 * **Returns:** 0 when accepted: then `cb` runs exactly once, later, never inside this call,
 * with `ret` 0 or a negative errno. A negative errno when refused: then `cb` never runs
 * (`-EINVAL` for bad arguments or a range past the virtual size, `-EAGAIN` when the queue is
 * full).
 *
 * **Ownership:** `buf` must stay valid, and untouched by the caller, until `cb` starts.
 * `opaque` is passed to `cb` and never touched by the library.
 *
 * **Thread-safety:** may be called concurrently from any thread, including from inside a
 * callback. Callbacks run on library threads unless the queue uses `QED_AIO_EVENT_LOOP`: the
 * engine's pool threads, or its io_uring thread, which also issues every image's reads and
 * writes. A callback should therefore return quickly and never wait for another request (no
 * `qed_aio_drain` or `qed_close` there; on the io_uring thread they return `-EDEADLK`).
 *
 * # Safety
 * Pointers must be valid as described; `img` a live handle.
 */
int qed_aio_read(struct qed_image *img, uint64_t offset, void *buf, size_t len, qed_completion_fn cb, void *opaque);

/**
 * Writes `len` bytes from `buf` at guest `offset`; `cb(opaque, ret)` runs once when done.
 *
 * **Returns:** as `qed_aio_read`; also `-EROFS` for a read-only image.
 *
 * **Ownership:** `buf` must stay valid and unchanged until `cb` starts.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * Pointers must be valid as described; `img` a live handle.
 */
int qed_aio_write(struct qed_image *img, uint64_t offset, const void *buf, size_t len, qed_completion_fn cb, void *opaque);

/**
 * Reads consecutive guest bytes at `offset` into the buffers of `iov`.
 *
 * **Returns:** as `qed_aio_read`.
 *
 * **Ownership:** the `iov` array is copied during the call and may be freed afterwards; the
 * buffers it names must stay valid until `cb` starts.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * Pointers must be valid as described; `img` a live handle.
 */
int qed_aio_readv(struct qed_image *img, uint64_t offset, const struct iovec *iov, int iovcnt, qed_completion_fn cb, void *opaque);

/**
 * Writes the buffers of `iov` to consecutive guest bytes at `offset`.
 *
 * **Returns:** as `qed_aio_write`.
 *
 * **Ownership:** as `qed_aio_readv`.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * Pointers must be valid as described; `img` a live handle.
 */
int qed_aio_writev(struct qed_image *img, uint64_t offset, const struct iovec *iov, int iovcnt, qed_completion_fn cb, void *opaque);

/**
 * Writes `len` bytes from `buf` at guest `offset` with request `flags` (`QED_REQ_*`);
 * `cb(opaque, ret)` runs once when done. With `QED_REQ_FUA`, `cb` runs once the write is
 * durable.
 *
 * **Returns:** as `qed_aio_write`; `-ENOTSUP` (and no callback) for a flag this version does
 * not know.
 *
 * **Ownership:** `buf` must stay valid and unchanged until `cb` starts.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * Pointers must be valid as described; `img` a live handle.
 */
int qed_aio_write_flags(struct qed_image *img, uint64_t offset, const void *buf, size_t len, unsigned int flags, qed_completion_fn cb, void *opaque);

/**
 * Writes the buffers of `iov` to consecutive guest bytes at `offset` with request `flags`.
 *
 * **Returns:** as `qed_aio_write_flags`.
 *
 * **Ownership:** as `qed_aio_readv`.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * Pointers must be valid as described; `img` a live handle.
 */
int qed_aio_writev_flags(struct qed_image *img, uint64_t offset, const struct iovec *iov, int iovcnt, unsigned int flags, qed_completion_fn cb, void *opaque);

/**
 * Makes `len` guest bytes at `offset` read as zeros, asynchronously.
 *
 * **Returns:** as `qed_aio_write`.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_write_zeroes(struct qed_image *img, uint64_t offset, uint64_t len, qed_completion_fn cb, void *opaque);

/**
 * `qed_write_zeroes_flags`, asynchronously: a refusal of `QED_ZERO_NO_FALLBACK` comes as
 * `cb(opaque, -ENOTSUP)`, with nothing changed.
 *
 * **Returns:** as `qed_aio_write`; `-ENOTSUP` (and `cb` never runs) for unknown flag bits.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_write_zeroes_flags(struct qed_image *img, uint64_t offset, uint64_t len, unsigned int flags, qed_completion_fn cb, void *opaque);

/**
 * `qed_discard`, asynchronously: `cb(opaque, ret)` runs once when the range reads as zeros.
 * Ordered like a write (a later `qed_aio_flush` covers it).
 *
 * **Returns:** as `qed_aio_write`.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_discard(struct qed_image *img, uint64_t offset, uint64_t len, qed_completion_fn cb, void *opaque);

/**
 * Flushes: `cb` runs after every write submitted before this call has completed and the
 * image file has been flushed, so those writes survive a crash.
 *
 * **Returns:** as `qed_aio_read`.
 *
 * **Thread-safety:** as `qed_aio_read`.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_flush(struct qed_image *img, qed_completion_fn cb, void *opaque);

/**
 * Waits until every submitted request has completed and its callback has returned. With
 * `QED_AIO_EVENT_LOOP` it runs the pending callbacks on this thread. Then, if the image has
 * had metadata updates since its need-check bit was last cleared and the idle timer is
 * pending, it settles the image at once, as QEMU does on drain (see `qed_settle`).
 *
 * **Returns:** 0; `-EDEADLK` when called from inside a callback of this image. (A storage
 * failure while settling fails the handle as a failed flush does; later calls report it.)
 *
 * **Thread-safety:** may be called from any thread except from this image's callbacks.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_drain(struct qed_image *img);

/**
 * With `QED_AIO_EVENT_LOOP`: a descriptor that becomes readable while completions are pending
 * (an eventfd on Linux, the read end of a pipe elsewhere). Add it to your poll set and call
 * `qed_aio_poll` when it is readable; do not read from it yourself.
 *
 * **Returns:** the file descriptor (owned by the library: do not close it; valid until
 * `qed_close`), or `-EINVAL` when the queue does not use `QED_AIO_EVENT_LOOP`.
 *
 * **Thread-safety:** any thread.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_get_fd(struct qed_image *img);

/**
 * With `QED_AIO_EVENT_LOOP`: runs the pending completion callbacks on this thread.
 *
 * **Returns:** how many callbacks ran (0 without `QED_AIO_EVENT_LOOP`); `-EDEADLK` from inside
 * a callback of this image.
 *
 * **Thread-safety:** any thread; callbacks run on the calling thread.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_poll(struct qed_image *img);

/**
 * Cancels the requests submitted with this `opaque` that have not started yet. Each still gets
 * its one callback, with `-ECANCELED`. Requests already running complete normally.
 *
 * **Returns:** how many requests were cancelled.
 *
 * **Thread-safety:** any thread, including inside callbacks.
 *
 * # Safety
 * `img` must be a live handle.
 */
int qed_aio_cancel(struct qed_image *img, void *opaque);

/**
 * Checks the image and, with `fix` (`QED_FIX_LEAKS | QED_FIX_ERRORS`), repairs it.
 *
 * **Returns:** 0 when the check ran (read `*result` for what it found: corruptions and leaks are
 * results, not call failures); `-EINVAL` for NULL arguments or unknown `fix` bits; `-EROFS` for
 * repairs on a read-only image; `-errno` when the check could not run.
 *
 * **Ownership:** `result` is borrowed and written only when 0 is returned.
 *
 * **Thread-safety:** may be called from any thread; other requests on the image wait for it.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_check(struct qed_image *img, unsigned int fix, struct qed_check_result *result);

/**
 * `qed_check` with a progress callback that can also stop it. Progress is in guest clusters
 * whose L2 table was examined, of the virtual disk's clusters.
 *
 * A check without repair stops at the next report after the callback returns nonzero,
 * having changed nothing. A repair stops only where the image is consistent: before its first
 * write (nothing changed), or, once it wrote a fix, after every corruption it found is fixed
 * (a stop asked for during the table scan waits until the scan's fixes are written) or between
 * two rounds of leak reclaiming. The handle stays usable; when anything was written, the
 * need-check bit stays set so that the next read-write open finishes the repair.
 *
 * **Returns:** as `qed_check`, and `-ECANCELED` when the callback stopped it (`*result` is
 * not written then).
 *
 * **Ownership:** `result` and `progress` are borrowed for the call; `progress` may be NULL
 * (no reports).
 *
 * **Thread-safety:** may be called from any thread; the callback runs on the calling thread,
 * while other requests on the image wait: it must not call functions on `img`.
 *
 * # Safety
 * As `qed_check`; `progress` is NULL or valid per the size-prefix rule, and its callback is
 * callable with its `opaque`.
 */
int qed_check_ext(struct qed_image *img, unsigned int fix, struct qed_check_result *result, const struct qed_progress *progress);

/**
 * Creates a QED image file at `path` (an existing file is replaced).
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or options out of range (the message names the
 * option); `-ENOTSUP` for a backing format other than raw or qed; `-errno` from the file system.
 *
 * **Ownership:** `path` and `opts` (with its strings) are borrowed for the call.
 *
 * **Thread-safety:** may be called from any thread.
 *
 * **NULL:** `path` and `opts` must not be NULL.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_create(const char *path, const struct qed_create_options *opts);

/**
 * Sends the library's reports to `cb`: every report at `level` or more important
 * (`QED_LOG_ERROR` = 1 .. `QED_LOG_TRACE` = 5) is passed to `cb(opaque, level, msg)`. `cb` NULL
 * removes the callback: reports then go where the `QED_DEBUG` environment variable says
 * (`error`, `warn`, `info`, `debug` or `trace`: to stderr, as `libqed: <level>: <msg>`;
 * unset: nowhere). Nothing is reported unless one of the two asks for it. A callback takes
 * the place of stderr.
 *
 * The callback:
 * - may be called from any thread, including library worker threads (asynchronous requests,
 *   the write-back timer), and from several threads at once;
 * - may be called while the library holds locks of the image it reports on: it must not call
 *   any function on a `qed_image` (that may deadlock), nor `qed_set_log_callback` (refused
 *   with `-EDEADLK`). It may call `qed_version`, `qed_strerror` and `qed_last_error`; reports
 *   the callback itself would cause are dropped;
 * - must return normally (no `longjmp`, no C++ exception);
 * - gets `msg` valid only during the call: copy it to keep it.
 *
 * `opaque` is passed back unchanged and must stay valid until the callback is replaced.
 *
 * **Returns:** 0; `-EINVAL` for a `level` outside 1..5 with a non-NULL `cb`; `-EDEADLK` when
 * called from inside the log callback.
 *
 * **Thread-safety:** may be called from any thread at any time; the setting is process-wide.
 * When it returns, calls to the previous callback have finished and none start again: its
 * `opaque` may then be freed.
 *
 * **NULL:** `cb` may be NULL (see above); `opaque` may be NULL.
 *
 * # Safety
 * `cb`, when not NULL, must be a function that may be called as described above with
 * `opaque`, until replaced.
 */
int qed_set_log_callback(int level, qed_log_fn cb, void *opaque);

/**
 * Fills `*stats` with the counters of `img` (see `struct qed_stats`). The library writes only
 * the first `stats->struct_size` bytes it knows; a caller built against a newer header sees
 * the fields this library lacks untouched.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or a `struct_size` no release had (see
 * "Structs that grow" at the top). `*stats` is written only on success.
 *
 * **Thread-safety:** may be called concurrently with any request on the same image, from
 * any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_get_stats(struct qed_image *img, struct qed_stats *stats);

/**
 * Starts an engine for `qed_open_options.engine`. Its threads start as requests need them: an
 * engine whose images are idle has none.
 *
 * **Returns:** 0 and `*out`; `-EINVAL` for a NULL `out`, a bad `struct_size`, more than 1024
 * threads or an unknown backend; `-ENOSYS`, `-EPERM` or another `-errno` when
 * `QED_IO_BACKEND_IO_URING` was asked for and the kernel refuses io_uring.
 *
 * **Ownership:** `opts` (may be NULL: defaults) is read during the call. `*out` belongs to the
 * caller, who frees it with `qed_engine_free`; images opened with it hold their own
 * reference, so it may be freed while they are open.
 *
 * **Thread-safety:** any thread; an engine may be used by any number of images and threads.
 *
 * # Safety
 * `opts` NULL or valid per the size-prefix rule; `out` valid for writing a pointer.
 */
int qed_engine_new(const struct qed_engine_options *opts, struct qed_engine **out);

/**
 * A reference to the process's engine, the one images use when `qed_open_options.engine` is
 * NULL (started now if no image has used it yet).
 *
 * **Returns:** 0 and `*out`; `-EINVAL` for a NULL `out` or a bad `QED_IO_ENGINE`; as
 * `qed_engine_new` when it cannot start.
 *
 * **Ownership:** free `*out` with `qed_engine_free` (the engine itself stays for the
 * process's lifetime).
 *
 * **Thread-safety:** any thread.
 *
 * # Safety
 * `out` valid for writing a pointer.
 */
int qed_engine_global(struct qed_engine **out);

/**
 * Drops the caller's reference. The engine stops its threads once no reference and no image
 * uses it; images opened with it keep working.
 *
 * **Ownership:** `eng` (NULL is ignored) is invalid afterwards.
 *
 * **Thread-safety:** any thread, but not concurrently with other calls on the same `eng`.
 *
 * # Safety
 * `eng` NULL or from `qed_engine_new` / `qed_engine_global`, not freed before.
 */
void qed_engine_free(struct qed_engine *eng);

/**
 * Fills `out` with the engine's backend, threads and request counters.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or a bad `out->struct_size`.
 *
 * **Ownership:** `out` is the caller's; written up to its `struct_size`.
 *
 * **Thread-safety:** any thread.
 *
 * # Safety
 * `eng` a live engine; `out` valid per the size-prefix rule.
 */
int qed_engine_get_stats(const struct qed_engine *eng, struct qed_engine_stats *out);

/**
 * Opens the image file at `path`.
 *
 * **Returns:** 0 and a handle in `*out`; `-EINVAL` for NULL arguments, unknown flags or an
 * invalid header; `-ENOTSUP` for unsupported features or backing formats; `-EAGAIN` when
 * another process holds a conflicting lock; `-EBUSY` when another handle of this process has the
 * file open read-write, or read-only for a read-write open (share that handle, or
 * `qed_reopen` it); `-EIO` for corruption that a read-write open could
 * not repair; other `-errno` from the operating system.
 *
 * **Ownership:** `path` is borrowed for the call. The handle must eventually be released with
 * `qed_close`. `*out` is written only on success.
 *
 * **Thread-safety:** may be called from any thread.
 *
 * **NULL:** `path` and `out` must not be NULL.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_open(const char *path, unsigned int flags, struct qed_image **out);

/**
 * Opens the QED image at `path` with the settings in `opts` (NULL: the defaults, read-only):
 * everything `qed_open` does, plus the L2 cache budget, the backing chain's depth limit, a
 * callback that approves each backing file, the write-back delay and the asynchronous queue.
 * An `opts` from a newer header that sets a field this library does not know is refused with
 * -ENOTSUP; one from an older header gets the defaults for the fields it lacks.
 *
 * **Returns:** as `qed_open`; `-EINVAL` also for a bad `opts->struct_size` or `opts->aio`;
 * `-EACCES` when `backing_approve` refuses a backing file (nothing is written then).
 *
 * **Ownership:** `opts` and `opts->aio` are borrowed for the call; `backing_approve_opaque`
 * is used only during the call. `*out` must eventually be released with `qed_close`.
 *
 * **Thread-safety:** may be called from any thread.
 *
 * **NULL:** `path` and `out` must not be NULL; `opts` may be.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above.
 */
int qed_open_ext(const char *path, const struct qed_open_options *opts, struct qed_image **out);

/**
 * Flushes, clears the need-check bit, releases the locks and frees the handle.
 *
 * Outstanding asynchronous requests are drained first: their callbacks run during this call
 * (on library threads, or on this thread in event-loop mode).
 *
 * **Returns:** 0, or `-errno` if the final flush or header write failed, or `-EIO` if the
 * handle had failed before (nothing is written then, and the need-check bit stays set for
 * the next read-write open to repair); the handle is freed even then, like `fclose`. From
 * inside one of the image's own callbacks, or from any callback on the engine's io_uring
 * thread (which would wait for itself), it returns `-EDEADLK` and frees nothing.
 *
 * **Ownership:** consumes `img`; it must not be used afterwards.
 *
 * **Thread-safety:** must be the last call on `img` and must not run concurrently with any
 * other call on it.
 *
 * **NULL:** `img` may be NULL (a no-op returning 0).
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_close(struct qed_image *img);

/**
 * Reads `len` bytes at guest `offset` into `buf`.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or a range past the virtual size; `-EIO` for
 * corrupt metadata on the way; other `-errno` from the storage.
 *
 * **Ownership:** `buf` is borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `buf` may be NULL only when `len` is 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_read(struct qed_image *img, uint64_t offset, void *buf, size_t len);

/**
 * Writes `len` bytes from `buf` at guest `offset`.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or a range past the virtual size; `-EROFS` on a
 * read-only image; `-EIO` for corrupt metadata; other `-errno` from the storage.
 *
 * **Ownership:** `buf` is borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `buf` may be NULL only when `len` is 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_write(struct qed_image *img, uint64_t offset, const void *buf, size_t len);

/**
 * Reads consecutive guest bytes at `offset` into the `iovcnt` buffers of `iov`.
 *
 * **Returns:** as `qed_read`; `-EINVAL` also for a negative `iovcnt`.
 *
 * **Ownership:** `iov` and its buffers are borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `iov` may be NULL only when `iovcnt` is 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_readv(struct qed_image *img, uint64_t offset, const struct iovec *iov, int iovcnt);

/**
 * Writes the `iovcnt` buffers of `iov` to consecutive guest bytes at `offset`.
 *
 * **Returns:** as `qed_write`; `-EINVAL` also for a negative `iovcnt`.
 *
 * **Ownership:** `iov` and its buffers are borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `iov` may be NULL only when `iovcnt` is 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_writev(struct qed_image *img, uint64_t offset, const struct iovec *iov, int iovcnt);

/**
 * Writes `len` bytes from `buf` at guest `offset` with request `flags` (`QED_REQ_*`, or 0 for
 * a plain `qed_write`).
 *
 * **Returns:** as `qed_write`; `-ENOTSUP` for a flag this version does not know. With
 * `QED_REQ_FUA`, a failure to make the write durable fails the handle as a failed `qed_flush`
 * does.
 *
 * **Ownership:** `buf` is borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `buf` may be NULL only when `len` is 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_write_flags(struct qed_image *img, uint64_t offset, const void *buf, size_t len, unsigned int flags);

/**
 * Writes the `iovcnt` buffers of `iov` to consecutive guest bytes at `offset` with request
 * `flags`.
 *
 * **Returns:** as `qed_write_flags`; `-EINVAL` also for a negative `iovcnt`.
 *
 * **Ownership:** `iov` and its buffers are borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `iov` may be NULL only when `iovcnt` is 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_writev_flags(struct qed_image *img, uint64_t offset, const struct iovec *iov, int iovcnt, unsigned int flags);

/**
 * Makes every write completed before this call durable.
 *
 * **Returns:** 0 or `-errno` from the storage. A failed flush is fatal for the handle (see
 * "Durability and storage failures" at the top): this and every later call return `-EIO`.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_flush(struct qed_image *img);

/**
 * Switches an open image between read-only (`flags` 0) and read-write (`flags`
 * `QED_OPEN_RDWR`) in place, keeping its caches, its backing chain (always read-only) and its
 * asynchronous queue, as QEMU's reopen does for live commit and snapshots. The file locks
 * change as QEMU's do, so other processes see the new mode. Going read-only writes everything
 * back and clears the need-check bit first, as `qed_close` does; going read-write repairs an
 * image whose need-check bit is set, as `qed_open` does.
 *
 * **Returns:** 0 (also when the image is already in that mode); `-ENOTSUP` for any other flag
 * bit (they are fixed at open) or, off Linux, for image files; `-EBUSY` when another handle of
 * this process has the file open in a conflicting way; `-EAGAIN` when another process does;
 * `-EINVAL` for a read-write reopen of a `QED_OPEN_FORCE_SHARE` handle; `-EIO` when the repair
 * leaves corruptions. On error the handle keeps its old mode (a storage failure fails the
 * handle, as for `qed_flush`).
 *
 * **Thread-safety:** may be called from any thread; waits for requests in flight, and requests
 * submitted meanwhile wait for it. Not from this image's completion callbacks.
 *
 * # Safety
 * `img` must come from `qed_open*` and not have been closed.
 */
int qed_reopen(struct qed_image *img, unsigned int flags);

/**
 * Writes everything back and clears the need-check bit now, as the idle timer does (see
 * `qed_open_options.need_check_delay_ms`): the file is then clean, and a crash before the next
 * allocating write needs no repair at the next open. For a caller about to copy or snapshot the
 * file, or whose guest is quiesced.
 *
 * **Returns:** 0 (also on a read-only image, which has nothing to do); `-errno` from the
 * storage, which is fatal for the handle as for `qed_flush`.
 *
 * **Thread-safety:** may be called from any thread; waits for requests in flight, and requests
 * submitted meanwhile wait for it.
 *
 * # Safety
 * `img` must come from `qed_open*` and not have been closed.
 */
int qed_settle(struct qed_image *img);

/**
 * Makes `len` guest bytes at `offset` read as zeros: whole unallocated clusters become zero
 * clusters without data writes; the rest is written with zeros.
 *
 * **Returns:** as `qed_write`.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_write_zeroes(struct qed_image *img, uint64_t offset, uint64_t len);

/**
 * Makes `len` guest bytes at `offset` read as zeros with request `flags` (`QED_ZERO_*`; 0
 * behaves as `qed_write_zeroes`, except that unallocated clusters of an image without a
 * backing file are left as they are).
 *
 * **Returns:** as `qed_write`; `-ENOTSUP` for unknown flag bits (named in `qed_last_error`),
 * and with `QED_ZERO_NO_FALLBACK` when zeros would have to be written (nothing changed).
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_write_zeroes_flags(struct qed_image *img, uint64_t offset, uint64_t len, unsigned int flags);

/**
 * Discards `len` guest bytes at `offset`: afterwards they read as zeros (also over a backing
 * file), and whole data clusters give their space back to the host file system (a hole is
 * punched in the image file; the cluster keeps its table entry, so the image stays
 * consistent). Partial clusters at the ends are written with zeros; where the storage cannot
 * punch holes, allocated clusters are too. Durable after the next `qed_flush`.
 *
 * **Returns:** as `qed_write`.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_discard(struct qed_image *img, uint64_t offset, uint64_t len);

/**
 * Grows the virtual size to `new_size` bytes (a multiple of 512).
 *
 * **Returns:** 0; `-ENOTSUP` for a smaller size (QED cannot shrink); `-EINVAL` for a size that
 * is not a multiple of 512 or too large for the geometry; `-EROFS` on a read-only image.
 *
 * **Thread-safety:** may be called from any thread; waits for requests in progress.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_truncate(struct qed_image *img, uint64_t new_size);

/**
 * Fills `*info` with the image's geometry, sizes and header bits.
 *
 * **Returns:** 0, or `-EINVAL` for NULL arguments. `*info` is written only on success.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_get_info(struct qed_image *img, struct qed_info *info);

/**
 * Copies the backing file name stored in the header into `buf` (NUL-terminated) and its
 * format (`"raw"`, `"qed"`, or `""` when unknown) into `fmt_buf`.
 *
 * **Returns:** the length of the name (0 when the image has no backing file), or `-ERANGE` when
 * a buffer is too small (nothing is written then), `-EINVAL` for NULL arguments. A `(NULL, 0)`
 * buffer is skipped, so `qed_get_backing_file(img, NULL, 0, NULL, 0)` returns the length
 * (the buffer then needs one more byte for the NUL).
 *
 * **Ownership:** both buffers are borrowed for the call.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * **NULL:** `buf` and `fmt_buf` may be NULL when their sizes are 0.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_get_backing_file(struct qed_image *img, char *buf, size_t size, char *fmt_buf, size_t fmt_size);

/**
 * Reports where the guest range starting at `offset` lives: the first extent of at most `len`
 * bytes whose bytes are all data (with a host offset), all zero clusters, or all unallocated.
 * Call again at `offset + extent.length` to walk a range.
 *
 * **Returns:** 0 with `*extent` filled; `-EINVAL` for NULL arguments, `len` 0 or a range past
 * the virtual size; `-EIO` for corrupt metadata.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_block_status(struct qed_image *img, uint64_t offset, uint64_t len, struct qed_extent *extent);

/**
 * Like `qed_block_status`, with `flags`: 0 answers for this image alone (as
 * `qed_block_status`); `QED_BLOCK_STATUS_CHAIN` answers through the backing chain: data
 * (`host_offset` in the file of the image at `depth`), zeros (a zero cluster, or a hole of a
 * raw backing file) or unallocated in every image (reads as zeros; `depth` is the deepest image
 * that covers the range), each extent ending where the answer changes. An image opened with
 * `QED_OPEN_NO_BACKING` answers for itself. `extent->depth` and `extent->flags` are filled when
 * `struct_size` includes them.
 *
 * **Returns:** 0 with `*extent` filled; `-EINVAL` for NULL arguments, a bad `struct_size`,
 * `len` 0 or a range past the virtual size; `-ENOTSUP` for unknown `flags` bits (nothing is
 * done); `-EIO` for corrupt metadata in any image of the chain, or a failed read of it.
 *
 * **Ownership:** `extent` is the caller's, written only on success.
 *
 * **Thread-safety:** may be called concurrently on the same image from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_block_status_ext(struct qed_image *img, uint64_t offset, uint64_t len, unsigned int flags, struct qed_extent *extent);

/**
 * Changes the backing file named in the header, as `qemu-img rebase -u` does (no data is
 * copied). `backing_file` NULL removes the backing file. `backing_format` is `"raw"`, `"qed"`
 * or NULL (probe at open).
 *
 * **Returns:** 0; `-EINVAL` for a name that does not fit in the header; `-ENOTSUP` for another
 * format; `-EROFS` on a read-only image; `-errno` when the new backing file cannot be opened
 * (nothing is changed then).
 *
 * **Ownership:** strings are borrowed for the call.
 *
 * **Thread-safety:** may be called from any thread; waits for requests in progress.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_change_backing_file(struct qed_image *img, const char *backing_file, const char *backing_format);

/**
 * Opens an image on caller-provided storage, with the settings in `opts` (NULL: the defaults,
 * read-only; see `qed_open_ext`). An image that names a backing file needs
 * `QED_OPEN_NO_BACKING` here. No file locks are taken and `QED_OPEN_DIRECT` has no effect:
 * the caller's storage is its own.
 *
 * **Returns:** as `qed_open_ext`; `-EINVAL` also when a required callback is NULL.
 *
 * **Ownership:** `ops` and `opts` are copied; `opaque` is passed to every callback until
 * `release` (if set) is called, once, when the handle is closed or when this call fails after
 * checking `ops`. The handle must eventually be released with `qed_close`.
 *
 * **Thread-safety:** may be called from any thread. **The callbacks may be called from several
 * library threads at once.**
 *
 * **NULL:** `ops` and `out` must not be NULL; `opaque` and `opts` may be.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_open_with_io(const struct qed_io_ops *ops, void *opaque, const struct qed_open_options *opts, struct qed_image **out);

/**
 * Creates an image on caller-provided storage (its old content is discarded). The backing file
 * name, if any, is stored but not opened.
 *
 * **Returns:** as `qed_create`.
 *
 * **Ownership:** `ops` and `opts` are borrowed for the call; once `ops` is accepted (all
 * required callbacks set), `release` (if set) is called exactly once before this returns,
 * whether it succeeds or fails.
 *
 * **Thread-safety:** may be called from any thread.
 *
 * # Safety
 * Pointers must be NULL where allowed or valid for the access described above; a handle
 * must come from `qed_open*` and not have been closed.
 */
int qed_create_with_io(const struct qed_io_ops *ops, void *opaque, const struct qed_create_options *opts);

/**
 * Commits `img` into its backing file: writes every cluster `img` holds (data, and zero
 * clusters as zeros) into the backing file named in its header, which this call opens
 * read-write (resolved relative to the image, as `qed_open` does), growing it to `img`'s size
 * if it is shorter, then flushes and closes it. `img` is left as it is and may be read-only;
 * it must have been opened with `QED_OPEN_NO_BACKING` (its own read-only hold on the backing
 * file would refuse the write). `flags` may hold `QED_OPEN_CONFINE_BACKING`,
 * `QED_OPEN_NO_LOCK` and `QED_OPEN_DIRECT`, applied to the backing file.
 *
 * Progress is in bytes of the clusters `img` holds. When the callback returns nonzero the
 * commit stops between steps of at most 2 MiB, flushes what it wrote and returns
 * `-ECANCELED`: the backing file then holds some of `img`'s clusters (each whole), which `img`
 * still shadows, so what `img` reads is unchanged and both images stay valid.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments or an image without a backing file; `-ENOTSUP`
 * for other flags; `-EBUSY` when `img` holds its backing file open; `-ECANCELED` when the
 * callback stopped it; `-errno` from opening or writing the backing file (`-EAGAIN` when
 * another process holds it).
 *
 * **Ownership:** `progress` is borrowed for the call and may be NULL (no reports).
 *
 * **Thread-safety:** may be called from any thread, with other requests on `img` running; the
 * callback runs on the calling thread.
 *
 * # Safety
 * `img` comes from `qed_open*` and was not closed; `progress` is NULL or valid per the
 * size-prefix rule, and its callback is callable with its `opaque`.
 */
int qed_commit(struct qed_image *img, unsigned int flags, const struct qed_progress *progress);

/**
 * Copies what `src` reads (through its backing chain) into `dst`, as `qemu-img convert`
 * does: zero runs of 4 KiB or more are not written as data, and are skipped altogether when
 * `dst` has no backing file and nothing allocated (a new image). `dst` must be read-write and
 * at least as large as `src`; it is flushed at the end, also when the copy stopped.
 *
 * Progress is in bytes of `src` walked. When the callback returns nonzero the copy stops
 * between steps of at most 2 MiB and returns `-ECANCELED`; `dst` is a valid image holding
 * part of the copy.
 *
 * **Returns:** 0; `-EINVAL` for NULL arguments, the same handle twice, or a `dst` smaller than
 * `src`; `-EROFS` when `dst` is read-only; `-ECANCELED` when the callback stopped it; `-errno`
 * for I/O errors.
 *
 * **Ownership:** `progress` is borrowed for the call and may be NULL (no reports).
 *
 * **Thread-safety:** may be called from any thread; the callback runs on the calling thread.
 * Writes to `src` during the copy may or may not be in the copy.
 *
 * # Safety
 * `src` and `dst` come from `qed_open*` and were not closed; `progress` is NULL or valid per
 * the size-prefix rule, and its callback is callable with its `opaque`.
 */
int qed_copy(struct qed_image *src, struct qed_image *dst, const struct qed_progress *progress);

/**
 * Streams the backing chain into the image while it stays in use: every cluster the image
 * does not have is copied from the backing chain (clusters that read as zeros become zero
 * clusters), then the data is flushed and the backing file is removed from the header, as
 * `qed_change_backing_file(img, NULL, NULL)` does. Guest reads and writes from other threads
 * and through the asynchronous queue go on meanwhile; a guest write always wins over the copy.
 * `progress` (NULL for none) is called with bytes of the virtual disk.
 *
 * **Returns:** 0 when the image no longer has a backing file (also when it had none);
 * `-ECANCELED` when the progress callback returned nonzero: the image is then a valid overlay
 * that still has its backing file and reads the same, and a later `qed_stream` finishes the
 * job (as after a crash in the middle of a stream); `-EROFS` for a read-only image;
 * `-EINVAL` for a NULL image, a bad `progress` struct, or an image opened with
 * `QED_OPEN_NO_BACKING` whose header names a backing file; `-errno` for I/O errors.
 *
 * **Ownership:** `progress` is borrowed for the duration of the call.
 *
 * **Thread-safety:** runs on the calling thread, which it blocks until done; the progress
 * callback runs on that thread. Other threads may use the image meanwhile.
 *
 * # Safety
 * `img` must come from `qed_open*` and not have been closed; `progress` is NULL or valid per
 * the size-prefix rule, and its callback may be called with its `opaque`.
 */
int qed_stream(struct qed_image *img, const struct qed_progress *progress);

/**
 * The library version, `"MAJOR.MINOR.PATCH"`.
 *
 * **Ownership:** static; never free it. **Thread-safety:** any thread. Never NULL.
 */
const char *qed_version(void);

/**
 * Static text for an errno value (either sign).
 *
 * **Ownership:** static; never free it. **Thread-safety:** any thread. Never NULL, even for
 * unknown values (`"unknown error"`).
 */
const char *qed_strerror(int err);

/**
 * This thread's message for its last failed `qed_` call, naming the function and what was
 * wrong (for example the header field and its value); `""` after a call that succeeded.
 *
 * **Ownership:** owned by the library; valid until this thread's next `qed_` call. Never free
 * it. **Thread-safety:** per thread. Never NULL.
 */
const char *qed_last_error(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* QED_H */
