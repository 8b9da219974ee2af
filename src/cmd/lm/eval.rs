use anyhow::Result;
pub fn run(_a: crate::lm_cli::LmEvalArgs) -> Result<()> {
    anyhow::bail!("todo")
}
