//! placeholder
pub fn run(_f: &[std::path::PathBuf], _h: Option<&std::path::Path>) -> Result<(), String> {
    Ok(())
}
