//! Markdown tables for the benchmark reports.

pub fn markdown(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = format!(
        "| {} |\n|{}|\n",
        header.join(" | "),
        header.iter().map(|_| "---").collect::<Vec<_>>().join("|")
    );
    for r in rows {
        out += &format!("| {} |\n", r.join(" | "));
    }
    out
}
