//! `sessionizer query`: SQL over the run's tables, with DataFusion.
//!
//! The tables that exist are registered as `events`, `sessions`, `live_sessions` (also as
//! `live`), `pending` and `late_events`, so the questions the reference jobs answer by hand are one command, e.g.
//! `SELECT avg(duration_ms) FROM sessions`.
//!
//! `query` is read-only. The tables are registered with delta-rs providers that accept
//! `INSERT`, and a DataFusion context runs `COPY … TO` and `CREATE TABLE` too, so every
//! statement is parsed first with DataFusion's own parser and only queries pass: `SELECT`,
//! `WITH`, `VALUES`, `EXPLAIN` of a query, `SHOW` and `DESCRIBE`. Anything else, even nested
//! (`EXPLAIN ANALYZE INSERT …`, `SELECT … INTO t`), is a usage error naming the statement,
//! before any table is opened. DataFusion's `SQLOptions`, with DDL, DML and other statements
//! turned off, checks the plan a second time.

use std::io::Write;
use std::ops::ControlFlow;

use arrow::array::RecordBatch;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::{SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Query, SetExpr, Statement, Visit, Visitor};
use datafusion::sql::sqlparser::dialect::GenericDialect;

use crate::cli::{QueryArgs, QueryFormat};
use crate::commands::read_tables::render;
use crate::config::TableLocation;
use crate::error::{Error, Result};

/// Runs `sql` against the tables of `tables`, returning the result batches.
pub async fn query(tables: &crate::config::Tables, sql: &str) -> Result<Vec<RecordBatch>> {
    check_read_only(sql).map_err(|what| {
        Error::usage(format!(
            "query is read-only: {what} is not allowed. Only SELECT, WITH, VALUES, EXPLAIN of a \
             query, SHOW and DESCRIBE run here. The tables are written by sessionize, \
             generate-rows and maintain; to save a result, use --format csv or json and \
             redirect the output"
        ))
    })?;
    // Column names keep their case (`userID`), as in the tables. The information schema makes
    // `SHOW TABLES` and `SHOW COLUMNS` work.
    let config = SessionConfig::new()
        .with_information_schema(true)
        .set_bool("datafusion.sql_parser.enable_ident_normalization", false);
    let ctx = SessionContext::new_with_config(config);
    let mut named: Vec<(&str, TableLocation)> = vec![
        ("events", tables.events.clone()),
        ("sessions", tables.sessions.clone()),
        ("live_sessions", tables.live.clone()),
        ("pending", tables.checkpoint.join("state")),
    ];
    if let Some(l) = &tables.late_events {
        named.push(("late_events", l.clone()));
    }
    let mut registered = Vec::new();
    for (name, loc) in named {
        if let Some(t) = crate::delta::try_load(&loc).await? {
            let provider = t.table_provider().await?;
            if name == "live_sessions" {
                ctx.register_table("live", provider.clone())?;
            }
            ctx.register_table(name, provider)?;
            registered.push(name);
        }
    }
    let read_only = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx.sql_with_options(sql, read_only).await.map_err(|e| {
        Error::usage(format!(
            "the query failed: {e}. Tables available: {}",
            if registered.is_empty() {
                "none (run sessionize first)".into()
            } else {
                registered.join(", ")
            }
        ))
    })?;
    Ok(df.collect().await?)
}

/// Refuses any statement that is not a query, naming it (`INSERT`, `COPY`, `CREATE TABLE`…).
///
/// Text DataFusion cannot parse passes here: the same parser then fails in `ctx.sql` and the
/// user gets its message with the tables available.
pub fn check_read_only(sql: &str) -> std::result::Result<(), String> {
    let Ok(statements) = DFParser::parse_sql_with_dialect(sql, &GenericDialect {}) else {
        return Ok(());
    };
    if statements.len() > 1 {
        return Err(format!(
            "more than one statement ({} given)",
            statements.len()
        ));
    }
    statements.iter().try_for_each(check_statement)
}

fn check_statement(statement: &DFStatement) -> std::result::Result<(), String> {
    match statement {
        DFStatement::Statement(s) => match s.visit(&mut ReadOnly) {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(what) => Err(what),
        },
        // `EXPLAIN` (and `EXPLAIN ANALYZE`, which runs its statement) of a query only.
        DFStatement::Explain(e) => check_statement(&e.statement),
        DFStatement::CreateExternalTable(_) => Err("CREATE EXTERNAL TABLE".into()),
        DFStatement::CopyTo(_) => Err("COPY".into()),
        DFStatement::Reset(_) => Err("RESET".into()),
    }
}

/// Walks a statement and everything nested in it; breaks with the name of the first
/// statement that is not a query.
struct ReadOnly;

impl Visitor for ReadOnly {
    type Break = String;

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<String> {
        match s {
            Statement::Query(_)
            | Statement::Explain { .. }
            | Statement::ExplainTable { .. }
            | Statement::ShowTables { .. }
            | Statement::ShowColumns { .. }
            | Statement::ShowViews { .. }
            | Statement::ShowSchemas { .. }
            | Statement::ShowDatabases { .. }
            | Statement::ShowCatalogs { .. }
            | Statement::ShowFunctions { .. }
            | Statement::ShowVariable { .. }
            | Statement::ShowVariables { .. }
            | Statement::ShowCreate { .. } => ControlFlow::Continue(()),
            other => ControlFlow::Break(statement_name(other)),
        }
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
        // `SELECT … INTO t` creates a table.
        fn selects_into(body: &SetExpr) -> bool {
            match body {
                SetExpr::Select(s) => s.into.is_some(),
                SetExpr::SetOperation { left, right, .. } => {
                    selects_into(left) || selects_into(right)
                }
                _ => false,
            }
        }
        if selects_into(&q.body) {
            ControlFlow::Break("SELECT … INTO".into())
        } else {
            ControlFlow::Continue(())
        }
    }
}

/// A statement's kind, for the error message: its leading keywords (`INSERT`, `CREATE
/// TABLE`, `DROP`…), never the whole text.
fn statement_name(s: &Statement) -> String {
    let name = match s {
        Statement::Insert(_) => "INSERT",
        Statement::Update(_) => "UPDATE",
        Statement::Delete(_) => "DELETE",
        Statement::Merge(_) => "MERGE",
        Statement::Copy { .. } | Statement::CopyIntoSnowflake { .. } => "COPY",
        Statement::CreateTable(_) => "CREATE TABLE",
        Statement::CreateView(_) => "CREATE VIEW",
        Statement::Drop { .. } => "DROP",
        Statement::Truncate(_) => "TRUNCATE",
        Statement::Set(_) => "SET",
        _ => {
            // The first word of the statement as sqlparser prints it.
            let text = s.to_string();
            return text
                .split_whitespace()
                .next()
                .unwrap_or("this statement")
                .to_ascii_uppercase();
        }
    };
    name.to_string()
}

pub async fn command(args: &QueryArgs, out: &mut dyn Write) -> Result<()> {
    let batches = query(&args.tables.resolve(), &args.sql).await?;
    match args.format {
        QueryFormat::Table => render(&batches, out)?,
        QueryFormat::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            for b in &batches {
                w.write(b)?;
            }
        }
        QueryFormat::Json => {
            let mut w = arrow::json::LineDelimitedWriter::new(out);
            for b in &batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::check_read_only;

    #[test]
    fn queries_pass() {
        for sql in [
            "SELECT 1",
            "select avg(duration_ms) from sessions",
            "WITH s AS (SELECT * FROM sessions) SELECT count(*) FROM s",
            "SELECT * FROM sessions UNION ALL SELECT * FROM sessions",
            "VALUES (1, 2)",
            "EXPLAIN SELECT * FROM sessions",
            "EXPLAIN ANALYZE SELECT * FROM sessions",
            "SHOW TABLES",
            "SHOW COLUMNS FROM sessions",
            "SHOW ALL",
            "DESCRIBE sessions",
            "SELECT * FROM (SELECT 1) AS t WHERE EXISTS (SELECT 1)",
            "SELECT 1;",
            // Not SQL DataFusion can parse: DataFusion reports it later.
            "SELEC 1",
        ] {
            assert_eq!(check_read_only(sql), Ok(()), "{sql}");
        }
    }

    #[test]
    fn anything_else_is_refused_by_name() {
        let cases = [
            ("INSERT INTO sessions SELECT * FROM sessions", "INSERT"),
            ("insert into events values (1, now(), 'x')", "INSERT"),
            ("UPDATE sessions SET event_count = 0", "UPDATE"),
            ("DELETE FROM sessions", "DELETE"),
            (
                "MERGE INTO live USING sessions ON live.user_id = sessions.user_id \
                 WHEN MATCHED THEN DELETE",
                "MERGE",
            ),
            ("COPY (SELECT 1) TO 'x.csv'", "COPY"),
            ("COPY sessions TO 'x.parquet'", "COPY"),
            ("CREATE TABLE t AS SELECT 1", "CREATE TABLE"),
            ("CREATE TABLE t (a INT)", "CREATE TABLE"),
            (
                "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION 'x.csv'",
                "CREATE EXTERNAL TABLE",
            ),
            ("CREATE VIEW v AS SELECT 1", "CREATE VIEW"),
            ("DROP TABLE sessions", "DROP"),
            ("TRUNCATE sessions", "TRUNCATE"),
            ("SET datafusion.execution.batch_size = 1", "SET"),
            ("RESET datafusion.execution.batch_size", "RESET"),
            (
                "EXPLAIN INSERT INTO sessions SELECT * FROM sessions",
                "INSERT",
            ),
            (
                "EXPLAIN ANALYZE INSERT INTO sessions SELECT * FROM sessions",
                "INSERT",
            ),
            ("EXPLAIN COPY (SELECT 1) TO 'x.csv'", "COPY"),
            ("SELECT * INTO t FROM sessions", "SELECT … INTO"),
            (
                "SELECT 1; INSERT INTO sessions SELECT * FROM sessions",
                "more than one",
            ),
            ("PREPARE p AS SELECT 1", "PREPARE"),
            ("BEGIN", "BEGIN"),
        ];
        for (sql, named) in cases {
            let err = check_read_only(sql).expect_err(sql);
            assert!(err.contains(named), "{sql}: {err}");
        }
    }
}
