//! The web comparison's load generator: virtual browsers, each with its own connection and
//! cookie, against one app (see `sessiond_web_bench::load`). Prints a summary, or the
//! report as JSON with `--json`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sessiond_web_bench::load::{self, LoadConfig, Mix};
use sessiond_web_bench::shop;

#[derive(Parser)]
#[command(about = "HTTP load with a cookie per virtual browser, then a lost-adds check")]
struct Args {
    /// The app's address (host:port).
    #[arg(long)]
    target: SocketAddr,
    /// Concurrent virtual browsers.
    #[arg(long, default_value_t = 64)]
    browsers: usize,
    /// Load before the measured window.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// The measured window.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Weights of cart reads, cart adds and logins.
    #[arg(long, default_value = "read=70,add=25,login=5")]
    mix: Mix,
    /// Distinct SKUs the adds pick from.
    #[arg(long, default_value_t = 20)]
    skus: usize,
    /// Browsers in the lost-adds check (0: skip it).
    #[arg(long, default_value_t = 20)]
    tab_browsers: usize,
    /// Concurrent tabs per browser in the lost-adds check.
    #[arg(long, default_value_t = 8)]
    tabs: usize,
    /// Adds per tab in the lost-adds check, each of its own SKU.
    #[arg(long, default_value_t = 5)]
    adds_per_tab: usize,
    /// Comma-separated PIDs (the store, then the app's processes) whose CPU over the
    /// window is reported.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// The name of the app's session cookie.
    #[arg(long, default_value = shop::COOKIE)]
    cookie: String,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.browsers == 0 || a.duration.is_zero() {
        anyhow::bail!("--browsers and --duration must be above 0");
    }
    let report = load::run(LoadConfig {
        target: a.target,
        browsers: a.browsers,
        warmup: a.warmup,
        duration: a.duration,
        mix: a.mix,
        skus: a.skus,
        tab_browsers: a.tab_browsers,
        tabs: a.tabs,
        adds_per_tab: a.adds_per_tab,
        pids: a.pids,
        cookie: a.cookie,
    })
    .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let o = &report.overall;
    println!(
        "{:.0} req/s, p50 {} µs, p99 {} µs, p99.9 {} µs",
        o.ops_per_second, o.p50_us, o.p99_us, o.p999_us
    );
    for (op, s) in &report.operations {
        let errors = report.errors.get(op).copied().unwrap_or(0);
        println!(
            "  {op:?}: {:.0} req/s, p50 {} µs, p99 {} µs, {errors} errors",
            s.ops_per_second, s.p50_us, s.p99_us
        );
    }
    if let Some(cpu) = &report.processes {
        println!(
            "CPU (cores busy): {:.2} {:?}",
            cpu.cpu_per_second, cpu.per_process
        );
    }
    if let Some(l) = &report.lost_adds {
        println!(
            "lost adds: {} of {} acknowledged ({} failed)",
            l.lost, l.acknowledged, l.failed
        );
    }
    Ok(())
}
