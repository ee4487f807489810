//! `sluice-load`: the load-test harness. A stub until its own issue lands.

fn main() {
    eprintln!("sluice-load: not implemented yet (see the README)");
    std::process::exit(2);
}
