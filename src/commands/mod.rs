//! One module per subcommand. Each has a `command(args, out)` entry that prints to `out`.

pub mod demo;
pub mod generate_rows;
pub mod maintain;
pub mod query;
pub mod read_tables;
pub mod reshard;
pub mod scenarios;
pub mod sessionize;
pub mod status;
