use anyhow::Result;
pub fn run(_a: crate::lm_cli::LmFinetuneArgs) -> Result<()> {
    anyhow::bail!("todo")
}
