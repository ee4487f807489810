//! placeholder
pub fn run_page(_j: &serde_json::Value) -> String {
    String::new()
}
