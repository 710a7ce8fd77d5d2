# A capture server in the test's own process: R's serverSocket() accepts and the test reads
# whatever the client's non-blocking writes left in the kernel's buffers.

free_port <- function() {
  for (i in 1:100) {
    port <- sample(20000:60000, 1)
    srv <- tryCatch(suppressWarnings(serverSocket(port)), error = function(e) NULL)
    if (!is.null(srv)) { close(srv); return(port) }
  }
  stop("no free port")
}

capture_server <- function(port = NULL) {
  s <- new.env()
  for (i in 1:100) {
    p <- if (is.null(port)) sample(20000:60000, 1) else port
    srv <- tryCatch(suppressWarnings(serverSocket(p)), error = function(e) NULL)
    if (!is.null(srv)) break
    if (!is.null(port)) Sys.sleep(0.05)
  }
  if (is.null(srv)) stop("cannot listen")
  s$port <- p
  s$srv <- srv
  s$conns <- list()
  s$partial <- list()
  s$lines <- character()
  s
}

# Accepts pending connections and reads what arrived; complete lines go to s$lines.
poll_server <- function(s, read = TRUE) {
  while (isTRUE(socketSelect(list(s$srv), timeout = 0))) {
    s$conns[[length(s$conns) + 1L]] <- socketAccept(s$srv, blocking = FALSE, open = "a+b")
    s$partial[[length(s$conns)]] <- raw()
  }
  if (!read) return(invisible(s))
  for (i in seq_along(s$conns)) {
    con <- s$conns[[i]]
    if (is.null(con)) next
    repeat {
      x <- tryCatch(readBin(con, "raw", 262144L), error = function(e) raw())
      if (!length(x)) break
      s$partial[[i]] <- c(s$partial[[i]], x)
    }
    buf <- s$partial[[i]]
    nl <- which(buf == as.raw(10L))
    if (length(nl)) {
      last <- nl[[length(nl)]]
      text <- rawToChar(buf[seq_len(last - 1L)])
      Encoding(text) <- "UTF-8"
      s$lines <- c(s$lines, strsplit(text, "\n", fixed = TRUE)[[1]])
      s$partial[[i]] <- buf[-seq_len(last)]
    }
  }
  invisible(s)
}

# Hangs up on every accepted connection (a sidecar restart, as the client sees it).
drop_connections <- function(s) {
  for (con in s$conns) if (!is.null(con)) close(con)
  s$conns <- list()
  s$partial <- list()
}

stop_server <- function(s) {
  drop_connections(s)
  close(s$srv)
}

# Flushes the client and reads until `n` lines arrived (or the deadline); returns them parsed.
collect <- function(s, mon, n, timeout = 10) {
  deadline <- Sys.time() + timeout
  repeat {
    flush(mon, 0.05)
    poll_server(s)
    if (length(s$lines) >= n || Sys.time() > deadline) break
    Sys.sleep(0.005)
  }
  lapply(s$lines, jsonlite::fromJSON, simplifyVector = FALSE)
}

# A client pointed at `port` through MONITORING_SIDECAR, with the propagation variables cleared.
new_client <- function(port, source = "test-job", ..., env = list()) {
  Sys.unsetenv(c("TRACEPARENT", "MONITORING_CONTEXT", "MONITORING_SOURCE"))
  Sys.setenv(MONITORING_SIDECAR = sprintf("127.0.0.1:%d", port))
  if (length(env)) do.call(Sys.setenv, env)
  monitoring_client(source, ..., on_error = function(msg) NULL)
}

clean_env <- function() Sys.unsetenv(c("TRACEPARENT", "MONITORING_CONTEXT", "MONITORING_SOURCE", "MONITORING_SIDECAR", "MONITORING_SIDECAR_TOKEN"))

TS_RE <- "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}[.][0-9]{3}Z$"

# A capture server on a Unix socket. R's own sockets are TCP only, so a Perl process (perl-base,
# on every Debian system) listens on `path` and writes each connection's bytes to a file of its
# own in `dir` (conn-1, conn-2, ... in accept order) until stop_unix_server().
UNIX_CAPTURE <- '
use strict;
use IO::Select;
use IO::Socket::UNIX;
use Socket qw(SOCK_STREAM);
my ($path, $dir) = @ARGV;
unlink $path;
my $listener = IO::Socket::UNIX->new(Local => $path, Type => SOCK_STREAM, Listen => 16) or die "listen on $path: $!";
open my $ready, ">", "$dir/ready" or die $!;
close $ready;
my $select = IO::Select->new($listener);
my %file;
my $n = () = glob "$dir/conn-*";  # a restart goes on numbering
my $until = time + 120;
while (!-e "$dir/stop" && time < $until) {
    for my $fh ($select->can_read(0.02)) {
        if ($fh == $listener) {
            my $conn = $listener->accept or next;
            $select->add($conn);
            $file{$conn} = "$dir/conn-" . ++$n;
            open my $f, ">", $file{$conn} or die $!;
            close $f;
            next;
        }
        my $got = sysread($fh, my $buf, 65536);
        if (!$got) { $select->remove($fh); close $fh; next }
        open my $f, ">>:raw", $file{$fh} or die $!;
        print {$f} $buf;
        close $f;
    }
}
unlink $path;
unlink "$dir/ready";
'

unix_capture_server <- function(dir = NULL) {
  if (is.null(dir)) {
    dir <- tempfile("unix-capture-")
    dir.create(dir)
  }
  unlink(file.path(dir, c("stop", "ready")))
  script <- file.path(dir, "capture.pl")
  writeLines(UNIX_CAPTURE, script)
  u <- list(dir = dir, path = file.path(dir, "s.sock"))
  system2("perl", c(script, u$path, dir), wait = FALSE)
  deadline <- Sys.time() + 10
  while (!file.exists(file.path(dir, "ready")) && Sys.time() < deadline) Sys.sleep(0.01)
  if (!file.exists(file.path(dir, "ready"))) stop("the Unix capture server did not start")
  u
}

stop_unix_server <- function(u) {
  file.create(file.path(u$dir, "stop"))
  deadline <- Sys.time() + 10
  while (file.exists(file.path(u$dir, "ready")) && Sys.time() < deadline) Sys.sleep(0.01)
}

# The complete lines of each connection so far, in accept order: a list of character vectors.
unix_connections <- function(u) {
  files <- list.files(u$dir, pattern = "^conn-[0-9]+$", full.names = TRUE)
  files <- files[order(as.integer(sub(".*conn-", "", files)))]
  lapply(files, function(f) {
    bytes <- readBin(f, "raw", file.size(f))
    text <- rawToChar(bytes)
    Encoding(text) <- "UTF-8"
    if (!nzchar(text)) character() else strsplit(sub("\n$", "", text), "\n", fixed = TRUE)[[1]]
  })
}

# Flushes the client until `n` lines arrived over all connections (or the deadline).
unix_collect <- function(u, mon, n, timeout = 10) {
  deadline <- Sys.time() + timeout
  repeat {
    flush(mon, 0.05)
    got <- unix_connections(u)
    if (sum(lengths(got)) >= n || Sys.time() > deadline) return(got)
    Sys.sleep(0.01)
  }
}
