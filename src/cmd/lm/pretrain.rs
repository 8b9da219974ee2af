use anyhow::Result;
pub fn run(_a: crate::lm_cli::LmPretrainArgs) -> Result<()> {
    anyhow::bail!("todo")
}
