//! The `escale` binary: all logic lives in the library; see `escale::cli`.

fn main() {
    escale::cli::main()
}
