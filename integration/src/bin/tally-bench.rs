//! `cargo bench-tally <scenario>...`: tally's load generator and the
//! SPEC §8 benchmark. Everything lives in `tally_integration::bench`.

fn main() -> std::process::ExitCode {
    tally_integration::bench::main()
}
