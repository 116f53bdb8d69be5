//! The binary: parse flags, set up logging, run the library, map errors to exit codes.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

use sessionizer::cli::LogFormat;
use sessionizer::config::{LayerError, parse_layered};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match parse_layered(std::env::args_os()) {
        Ok(c) => c,
        Err(LayerError::Clap(e)) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
        Err(LayerError::Usage(msg)) => {
            eprintln!("sessionizer: error: {msg}");
            return ExitCode::from(2);
        }
    };
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        // delta-rs logs expected conditions (a table not created yet, derived merge metrics)
        // at warn/error; our own errors reach the user through the exit path instead. The run
        // summary is always logged, so a scheduler's log keeps one line per run.
        (false, 0) => "warn,sessionizer::summary=info,deltalake_core=error,buoyant_kernel=off",
        (false, 1) => "sessionizer=info,warn,buoyant_kernel=off",
        (false, _) => "sessionizer=debug,info",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    sessionizer::progress::enable(!cli.quiet && std::io::stderr().is_terminal());

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Buffers a worker allocated (decoded file pieces) are freed by the engine threads;
        // mimalloc hands such memory back only when its owner next collects, so an idle worker
        // collects. SAFETY: `mi_collect` takes no pointers and is allowed on any thread.
        .on_thread_park(|| unsafe { libmimalloc_sys::mi_collect(false) })
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sessionizer: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let mut stdout = std::io::stdout().lock();
    let result = runtime.block_on(sessionizer::run(cli, &mut stdout));
    let _ = stdout.flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A closed stdout pipe (`sessionizer read-tables | head`) is not an error.
        Err(sessionizer::Error::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sessionizer: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
