/* SPDX-License-Identifier: MIT OR Apache-2.0 */
/*
 * nbdkit-qed-plugin: serves a QED image over NBD through libqed's public C API (qed.h).
 *
 *   nbdkit qed file=disk.qed [confine-backing=true] [direct=true] [readonly=true]
 *
 * One qed_image per plugin instance, shared by every connection and refcounted: it is opened
 * by the first connection and closed by the last one, so the file is clean (need-check bit
 * cleared, locks released) whenever no client is connected. Sharing one handle is what makes
 * multi-conn safe: qed_flush makes every write completed on the handle durable, whichever
 * connection sent it, and every connection sees the others' writes at once (one cache).
 * The handle is opened read-only when the first connection is read-only (`nbdkit -r`) and
 * reopened read-write in place (qed_reopen) if a later connection needs to write.
 */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <qed.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* Largest request we advertise: NBD clients commonly cap at 32 MiB. */
#define MAX_REQUEST (32u << 20)

static char *filename;
static unsigned int open_flags; /* QED_OPEN_CONFINE_BACKING, QED_OPEN_DIRECT from parameters */
static bool param_readonly;     /* readonly=true: never open the image for writing */

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER; /* guards img, refs, img_rw */
static qed_image *img;
static unsigned int refs;
static bool img_rw;

/* Logs `what` with libqed's message for this thread's last error and sets errno for the
 * client; always returns -1 so callers can `return fail(...)`. */
static int
fail (int ret, const char *what)
{
  const char *msg = qed_last_error ();
  nbdkit_error ("%s: %s: %s", filename ? filename : "qed", what,
                msg && *msg ? msg : qed_strerror (ret));
  nbdkit_set_error (-ret);
  return -1;
}

static void
qed_unload (void)
{
  /* A connection still open at unload is impossible; close defensively anyway. */
  if (img)
    qed_close (img);
  img = NULL;
  free (filename);
}

static int
qed_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    filename = nbdkit_absolute_path (value);
    if (filename == NULL)
      return -1;
  }
  else if (strcmp (key, "confine-backing") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    open_flags = r ? (open_flags | QED_OPEN_CONFINE_BACKING) : (open_flags & ~QED_OPEN_CONFINE_BACKING);
  }
  else if (strcmp (key, "direct") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    open_flags = r ? (open_flags | QED_OPEN_DIRECT) : (open_flags & ~QED_OPEN_DIRECT);
  }
  else if (strcmp (key, "readonly") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    param_readonly = r;
  }
  else {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
qed_config_complete (void)
{
  if (filename == NULL) {
    nbdkit_error ("the file parameter is required (file=disk.qed)");
    return -1;
  }
  return 0;
}

/* Opens the image once read-only before serving, so a missing file, a corrupt header or a
 * refused backing file stops nbdkit at startup instead of failing each connection. Shared
 * (force-share) and closed again at once: the connections open the real handle, and no
 * library threads exist yet when nbdkit forks into the background. */
static int
qed_get_ready (void)
{
  qed_open_options o = QED_INIT (qed_open_options);
  qed_image *probe;
  int ret;
  o.flags = open_flags | QED_OPEN_FORCE_SHARE;
  ret = qed_open_ext (filename, &o, &probe);
  if (ret < 0)
    return fail (ret, "open");
  qed_close (probe);
  return 0;
}

#define qed_config_help \
  "file=<FILENAME>       (required) The QED image to serve.\n" \
  "confine-backing=true  Only follow backing files inside the image's folder.\n" \
  "direct=true           Open the image file with O_DIRECT.\n" \
  "readonly=true         Open the image read-only (as nbdkit -r, whatever the client asks)."

static void *
qed_nbd_open (int readonly)
{
  int ret = 0;
  /* readonly=true: the connection is read-only whatever nbdkit -r says, so the file is never
   * opened for writing and can_write reports false (nbdkit then refuses writes with EPERM). */
  readonly = readonly || param_readonly;
  pthread_mutex_lock (&lock);
  if (img == NULL) {
    qed_open_options o = QED_INIT (qed_open_options);
    o.flags = open_flags | (readonly ? 0 : QED_OPEN_RDWR);
    ret = qed_open_ext (filename, &o, &img);
    if (ret == 0)
      img_rw = !readonly;
  }
  else if (!readonly && !img_rw) {
    /* A read-write connection after read-only ones: upgrade the shared handle in place. */
    ret = qed_reopen (img, QED_OPEN_RDWR);
    if (ret == 0)
      img_rw = true;
  }
  if (ret == 0)
    refs++;
  pthread_mutex_unlock (&lock);
  if (ret < 0) {
    fail (ret, readonly ? "open read-only" : "open read-write");
    return NULL;
  }
  /* Connections carry no state of their own; any non-NULL handle will do. */
  return &img;
}

static void
qed_nbd_close (void *handle)
{
  (void) handle;
  pthread_mutex_lock (&lock);
  if (--refs == 0) {
    int ret = qed_close (img);
    img = NULL;
    if (ret < 0)
      fail (ret, "close");
  }
  pthread_mutex_unlock (&lock);
}

/* The shared image's geometry; 0 or -1 after fail(). */
static int
image_info (qed_info *info)
{
  int ret;
  *info = QED_INIT (qed_info);
  ret = qed_get_info (img, info);
  return ret < 0 ? fail (ret, "get_info") : 0;
}

static int64_t
qed_get_size (void *handle)
{
  qed_info info;
  (void) handle;
  if (image_info (&info) < 0)
    return -1;
  return (int64_t) info.virtual_size;
}

static int
qed_block_size (void *handle, uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  qed_info info;
  (void) handle;
  if (image_info (&info) < 0)
    return -1;
  /* The library reads and writes any byte range; 512 keeps clients off sub-sector RMW, and
   * whole clusters avoid partial-cluster copies from the backing file. */
  *minimum = 512;
  *preferred = info.cluster_size;
  *maximum = MAX_REQUEST;
  return 0;
}

static int
qed_can_write (void *handle)
{
  bool rw;
  (void) handle;
  pthread_mutex_lock (&lock);
  rw = img_rw;
  pthread_mutex_unlock (&lock);
  return rw;
}

static int
qed_can_true (void *handle)
{
  (void) handle;
  return 1;
}

static int
qed_can_fua (void *handle)
{
  (void) handle;
  return NBDKIT_FUA_NATIVE;
}

static int
qed_can_cache (void *handle)
{
  (void) handle;
  /* A read warms the L2 cache and the page cache; nbdkit does that read for us. */
  return NBDKIT_CACHE_EMULATE;
}

static int
qed_pread (void *handle, void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  int ret;
  (void) handle;
  (void) flags;
  ret = qed_read (img, offset, buf, count);
  return ret < 0 ? fail (ret, "read") : 0;
}

static int
qed_pwrite (void *handle, const void *buf, uint32_t count, uint64_t offset, uint32_t flags)
{
  int ret;
  (void) handle;
  ret = qed_write_flags (img, offset, buf, count, (flags & NBDKIT_FLAG_FUA) ? QED_REQ_FUA : 0);
  return ret < 0 ? fail (ret, "write") : 0;
}

static int
qed_nbd_flush (void *handle, uint32_t flags)
{
  int ret;
  (void) handle;
  (void) flags;
  ret = qed_flush (img);
  return ret < 0 ? fail (ret, "flush") : 0;
}

/* FUA on zero and trim: the request is followed by a flush, which covers it. */
static int
flush_if_fua (uint32_t flags)
{
  int ret;
  if (!(flags & NBDKIT_FLAG_FUA))
    return 0;
  ret = qed_flush (img);
  return ret < 0 ? fail (ret, "flush") : 0;
}

static int
qed_zero (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  unsigned int zflags = 0;
  int ret;
  (void) handle;
  if (flags & NBDKIT_FLAG_MAY_TRIM)
    zflags |= QED_ZERO_MAY_UNMAP;
  if (flags & NBDKIT_FLAG_FAST_ZERO)
    zflags |= QED_ZERO_NO_FALLBACK;
  ret = qed_write_zeroes_flags (img, offset, count, zflags);
  if (ret == -ENOTSUP && (flags & NBDKIT_FLAG_FAST_ZERO)) {
    /* Not an error: the client asked to be told that zeroing would be slow. */
    nbdkit_set_error (ENOTSUP);
    return -1;
  }
  if (ret < 0)
    return fail (ret, "write zeroes");
  return flush_if_fua (flags);
}

static int
qed_trim (void *handle, uint32_t count, uint64_t offset, uint32_t flags)
{
  int ret;
  (void) handle;
  ret = qed_discard (img, offset, count);
  if (ret < 0)
    return fail (ret, "discard");
  return flush_if_fua (flags);
}

static int
qed_extents (void *handle, uint32_t count, uint64_t offset, uint32_t flags,
             struct nbdkit_extents *extents)
{
  uint64_t end = offset + count;
  (void) handle;
  while (offset < end) {
    qed_extent e = QED_INIT (qed_extent);
    uint32_t type;
    int ret = qed_block_status_ext (img, offset, end - offset, QED_BLOCK_STATUS_CHAIN, &e);
    if (ret < 0)
      return fail (ret, "block status");
    if (e.length == 0) {
      nbdkit_error ("block status returned an empty extent at %" PRIu64, offset);
      nbdkit_set_error (EIO);
      return -1;
    }
    /* Zero clusters and ranges no image of the chain stores both read as zeros. */
    type = e.status == QED_BLOCK_DATA ? 0 : (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);
    if (nbdkit_add_extent (extents, offset, e.length, type) == -1)
      return -1;
    offset += e.length;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name = "qed",
  .longname = "nbdkit QED plugin (libqed)",
#ifdef QED_PLUGIN_VERSION
  .version = QED_PLUGIN_VERSION,
#endif
  .description = "Serves a QEMU QED disk image through libqed.",
  .unload = qed_unload,
  .config = qed_config,
  .config_complete = qed_config_complete,
  .config_help = qed_config_help,
  .get_ready = qed_get_ready,
  .magic_config_key = "file",
  .open = qed_nbd_open,
  .close = qed_nbd_close,
  .get_size = qed_get_size,
  .block_size = qed_block_size,
  .can_write = qed_can_write,
  .can_flush = qed_can_true,
  .can_trim = qed_can_write,
  .can_zero = qed_can_true,
  .can_fast_zero = qed_can_true,
  .can_fua = qed_can_fua,
  .can_multi_conn = qed_can_true,
  .can_extents = qed_can_true,
  .can_cache = qed_can_cache,
  .pread = qed_pread,
  .pwrite = qed_pwrite,
  .flush = qed_nbd_flush,
  .trim = qed_trim,
  .zero = qed_zero,
  .extents = qed_extents,
  .errno_is_preserved = 0,
};

NBDKIT_REGISTER_PLUGIN (plugin)
