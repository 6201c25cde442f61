// SPDX-License-Identifier: MIT OR Apache-2.0
//! qed-img's command line: the clap definitions, kept apart from main.rs so that the manual-page
//! generator (examples/qed-img-man.rs) renders the very same options.

use clap::{Args, Parser, Subcommand};

/// What qed-img's exit codes mean (shown by `--help` and in the manual page).
pub(crate) const EXIT_STATUS: &str = "\
Exit status: as qemu-img. check: 0 clean, 1 check failed, 2 corruptions found, 3 leaks found. \
compare: 0 same, 1 different, 2 open error, 4 read error. Any other error prints \
`<name>: <what went wrong>` on stderr (name: the program's file name as invoked, like \
qemu-img) and exits 1.";

#[derive(Parser, Debug)]
#[command(
    name = "qed-img",
    version,
    about = "qemu-img's commands for QED and raw disk images, on libqed",
    long_about = None,
    after_long_help = EXIT_STATUS
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
    /// Create a QED (or raw) image
    Create(CreateArgs),
    /// Show what an image's header says
    Info(InfoArgs),
    /// Check an image's metadata, optionally repairing it
    Check(CheckArgs),
    /// Show where each guest range of an image lives
    Map(MapArgs),
    /// Copy an image into a new one (raw <-> qed), leaving zero runs unwritten
    Convert(ConvertArgs),
    /// Compare the guest contents of two images
    Compare(CompareArgs),
    /// Grow an image's virtual size
    Resize(ResizeArgs),
    /// Change an image's backing file (-u: header only; else copy what differs first)
    Rebase(RebaseArgs),
    /// Write an overlay's clusters down into its backing file
    Commit(CommitArgs),
    /// Copy the backing chain into the overlay, then drop the backing file (live streaming's
    /// offline form)
    Stream(StreamArgs),
    /// Copy guest bytes into a new image block by block, as dd(1)
    ///
    /// Operands are dd's: if=INPUT and of=OUTPUT (both needed), bs=BLOCK_SIZE (default 512,
    /// with K/M/G suffixes), count=BLOCKS (copy only this many blocks), skip=BLOCKS (start this
    /// many blocks into the input). OUTPUT is created (or truncated) with the size of what is
    /// copied, in -O's format.
    Dd(DdArgs),
    /// Run a simple I/O benchmark, as qemu-img bench
    ///
    /// qemu-img bench's requests in its order: DEPTH in flight, each completion starting the
    /// next. QED images run through libqed's asynchronous queue (the engine of the C qed_aio_*
    /// functions); raw files through DEPTH threads making synchronous calls. The time covers
    /// the requests only, not opening or closing.
    Bench(BenchArgs),
    /// Give back the host space of data clusters that read as zeros
    ///
    /// In place: every allocated cluster of a QED image whose bytes are all zeros gets a hole
    /// punched in the image file (fallocate PUNCH_HOLE), so a guest's written-then-zeroed
    /// space returns to the host file system. Each cluster keeps its table entry and still
    /// reads as zeros, so the image stays consistent (qemu-img check finds no leak) and its
    /// contents do not change. The backing file is not opened. Fails when the file system
    /// cannot punch holes.
    Sparsify(SparsifyArgs),
}

#[derive(Args, Debug)]
pub(crate) struct DdArgs {
    #[command(flatten)]
    pub(crate) image_opts: ImageOptsArg,
    /// Input format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Output format: raw (default) or qed
    #[arg(short = 'O', value_name = "OUTPUT_FMT")]
    pub(crate) out_fmt: Option<String>,
    /// Open the input even if another process is writing it
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// dd operands: if=INPUT of=OUTPUT [bs=BLOCK_SIZE] [count=BLOCKS] [skip=BLOCKS]
    #[arg(value_name = "OPERAND")]
    pub(crate) operands: Vec<String>,
}

#[derive(Args, Debug)]
pub(crate) struct SparsifyArgs {
    /// Image format (must be qed)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Quiet: print nothing on success
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// The QED image to sparsify in place
    pub(crate) file: String,
}

/// `--image-opts`.
#[derive(Args, Debug, Clone)]
pub(crate) struct ImageOptsArg {
    /// The image is given as QEMU block options (driver=qed,file.filename=F,...: formats qed
    /// and raw over file, blkdebug or quorum nodes) rather than a file name; `json:{...}` names
    /// are taken without it
    #[arg(long = "image-opts")]
    pub(crate) image_opts: bool,
}

/// `--output=human|json`.
#[derive(Args, Debug, Clone)]
pub(crate) struct OutputArg {
    /// Output format
    #[arg(long = "output", value_name = "FMT", default_value = "human",
          value_parser = ["human", "json"])]
    pub(crate) output: String,
}

impl OutputArg {
    pub(crate) fn json(&self) -> bool {
        self.output == "json"
    }
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Image format: qed (default) or raw
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Format options: cluster_size=N,table_size=N,backing_file=F,backing_fmt=F (`-o help` lists them)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Backing file (a relative name is relative to the new image's folder)
    #[arg(short = 'b', value_name = "BACKING")]
    pub(crate) backing: Option<String>,
    /// Backing file format (raw or qed; probed when omitted)
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    pub(crate) backing_fmt: Option<String>,
    /// Do not open the backing file (a size must then be given)
    #[arg(short = 'u')]
    pub(crate) unsafe_: bool,
    /// Quiet: print nothing on success
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Image file to create
    pub(crate) file: String,
    /// Virtual size, with an optional K/M/G/T/P/E suffix (default with -b: the backing file's)
    pub(crate) size: Option<String>,
}

#[derive(Args, Debug)]
pub(crate) struct InfoArgs {
    #[command(flatten)]
    pub(crate) image_opts: ImageOptsArg,
    /// Image format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    #[command(flatten)]
    pub(crate) output: OutputArg,
    /// Show every image of the backing chain
    #[arg(long = "backing-chain")]
    pub(crate) backing_chain: bool,
    /// Open the image even if another process is writing it
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    pub(crate) file: String,
}

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    pub(crate) image_opts: ImageOptsArg,
    /// Image format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Repair: `leaks` (leaked clusters) or `all` (leaks and corruptions)
    #[arg(short = 'r', value_name = "leaks|all", value_parser = ["leaks", "all"])]
    pub(crate) repair: Option<String>,
    #[command(flatten)]
    pub(crate) output: OutputArg,
    /// Show progress as qemu-img does: (x.xx/100%) lines on stdout
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet: print nothing, use the exit code
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Open the image even if another process is writing it (no repair)
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    pub(crate) file: String,
}

#[derive(Args, Debug)]
pub(crate) struct MapArgs {
    #[command(flatten)]
    pub(crate) image_opts: ImageOptsArg,
    /// Image format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    #[command(flatten)]
    pub(crate) output: OutputArg,
    /// First guest offset to map
    #[arg(short = 's', long = "start-offset", value_name = "OFFSET")]
    pub(crate) start: Option<String>,
    /// Map at most this many bytes
    #[arg(short = 'l', long = "max-length", value_name = "LENGTH")]
    pub(crate) length: Option<String>,
    /// Open the image even if another process is writing it
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    pub(crate) file: String,
}

#[derive(Args, Debug)]
pub(crate) struct ConvertArgs {
    #[command(flatten)]
    pub(crate) image_opts: ImageOptsArg,
    /// Source format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Output format: raw (default, as qemu-img) or qed
    #[arg(short = 'O', value_name = "OUTPUT_FMT")]
    pub(crate) out_fmt: Option<String>,
    /// Output format options (cluster_size=N,table_size=N,backing_file=F,backing_fmt=F)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
    /// Backing file of the new QED target (as -o backing_file=): only what SRC's top image
    /// holds is copied, the rest being taken to be in BACKING already (SRC's own backing chain
    /// must read the same)
    #[arg(short = 'B', value_name = "BACKING")]
    pub(crate) backing: Option<String>,
    /// Keep going after read errors in the source: a sector that cannot be read is written as
    /// zeros, a range whose block status cannot be read is copied as data; each gives a
    /// warning on stderr (as qemu-img)
    #[arg(long = "salvage")]
    pub(crate) salvage: bool,
    /// Format of -B's backing file (raw or qed; needed with a backing file, as qemu-img)
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    pub(crate) backing_fmt: Option<String>,
    /// Show progress as qemu-img does: (x.xx/100%) lines on stdout
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Do not create the target: write into the existing DST (zero runs are then zeroed)
    #[arg(short = 'n')]
    pub(crate) no_create: bool,
    /// Smallest run of zeros left unwritten (default 4k; 0 writes everything)
    #[arg(short = 'S', value_name = "SPARSE_SIZE")]
    pub(crate) sparse: Option<String>,
    /// Target cache mode (accepted for compatibility; `none`/`directsync` open DST with O_DIRECT)
    #[arg(short = 't', value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    /// Source cache mode (accepted for compatibility)
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub(crate) src_cache: Option<String>,
    /// Open the source even if another process is writing it
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    pub(crate) src: String,
    pub(crate) dst: String,
}

#[derive(Args, Debug)]
pub(crate) struct CompareArgs {
    #[command(flatten)]
    pub(crate) image_opts: ImageOptsArg,
    /// Format of the first image (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt1: Option<String>,
    /// Format of the second image (probed when omitted)
    #[arg(short = 'F', value_name = "FMT")]
    pub(crate) fmt2: Option<String>,
    /// Strict: images of different sizes differ
    #[arg(short = 's', long = "strict")]
    pub(crate) strict: bool,
    /// Show progress as qemu-img does: (x.xx/100%) lines on stdout
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet: print nothing, use the exit code
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Cache mode (accepted for compatibility)
    #[arg(short = 'T', value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    /// Open the images even if another process is writing them
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    pub(crate) file1: String,
    pub(crate) file2: String,
}

#[derive(Args, Debug)]
pub(crate) struct ResizeArgs {
    /// Image format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Allow shrinking (raw images only: QED cannot shrink)
    #[arg(long = "shrink")]
    pub(crate) shrink: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    pub(crate) file: String,
    /// New size, or +SIZE / -SIZE relative to the current one
    #[arg(allow_hyphen_values = true)]
    pub(crate) size: String,
}

#[derive(Args, Debug)]
pub(crate) struct RebaseArgs {
    /// Image format (must be qed)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// New backing file ("" removes it)
    #[arg(short = 'b', value_name = "BACKING")]
    pub(crate) backing: Option<String>,
    /// New backing file format (raw or qed; probed when omitted)
    #[arg(short = 'F', value_name = "BACKING_FMT")]
    pub(crate) backing_fmt: Option<String>,
    /// Unsafe: change the header only, copy nothing
    #[arg(short = 'u')]
    pub(crate) unsafe_: bool,
    /// Show progress as qemu-img does: (x.xx/100%) lines on stdout
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Cache modes (accepted for compatibility)
    #[arg(short = 't', value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub(crate) src_cache: Option<String>,
    pub(crate) file: String,
}

#[derive(Args, Debug)]
pub(crate) struct StreamArgs {
    /// Image format (must be qed)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Print progress as qemu-img -p does: `    (12.34/100%)` lines ended by a carriage return
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    pub(crate) file: String,
}

#[derive(Args, Debug)]
pub(crate) struct CommitArgs {
    /// Image format (must be qed)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Show progress as qemu-img does: (x.xx/100%) lines on stdout
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Keep the overlay as it is (QED overlays are never emptied, as with qemu-img)
    #[arg(short = 'd')]
    pub(crate) drop: bool,
    /// Commit into this image of the backing chain rather than the backing file: everything
    /// the images above it hold is written into it (a relative name is relative to the folder
    /// of the image that names it as its backing file, or give the path)
    #[arg(short = 'b', value_name = "BASE")]
    pub(crate) base: Option<String>,
    /// Cache mode (accepted for compatibility)
    #[arg(short = 't', value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    pub(crate) file: String,
}

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    /// Image format (probed when omitted)
    #[arg(short = 'f', value_name = "FMT")]
    pub(crate) fmt: Option<String>,
    /// Number of requests (default 75000)
    #[arg(short = 'c', long = "count", value_name = "COUNT")]
    pub(crate) count: Option<String>,
    /// Requests in flight (default 64)
    #[arg(short = 'd', long = "depth", value_name = "DEPTH")]
    pub(crate) depth: Option<String>,
    /// Request size (default 4K)
    #[arg(short = 's', long = "buffer-size", value_name = "BUFFER_SIZE")]
    pub(crate) buf_size: Option<String>,
    /// Offset step between requests (default: the request size)
    #[arg(short = 'S', long = "step-size", value_name = "STEP_SIZE")]
    pub(crate) step: Option<String>,
    /// First offset (default 0)
    #[arg(short = 'o', long = "offset", value_name = "OFFSET")]
    pub(crate) offset: Option<String>,
    /// Write instead of read
    #[arg(short = 'w', long = "write")]
    pub(crate) write: bool,
    /// Byte written by -w (default 0)
    #[arg(long = "pattern", value_name = "PATTERN")]
    pub(crate) pattern: Option<String>,
    /// Cache mode: writeback (default), none (O_DIRECT), writethrough, directsync, unsafe
    #[arg(short = 't', long = "cache", value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    /// AIO mode (accepted and ignored: libqed has one I/O path)
    #[arg(short = 'i', long = "aio", value_name = "AIO")]
    pub(crate) aio: Option<String>,
    /// Native AIO: here, O_DIRECT
    #[arg(short = 'n', long = "native")]
    pub(crate) native: bool,
    /// Flush every N requests, after draining the requests in flight (write tests)
    #[arg(long = "flush-interval", value_name = "N")]
    pub(crate) flush_interval: Option<String>,
    /// Send each --flush-interval flush alongside the requests in flight, without draining
    #[arg(long = "no-drain")]
    pub(crate) no_drain: bool,
    /// Quiet
    #[arg(short = 'q')]
    pub(crate) quiet: bool,
    /// Open the image even if another process is writing it (read tests)
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    pub(crate) file: String,
}
