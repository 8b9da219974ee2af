use anyhow::Result;
pub fn run(_a: crate::lm_cli::LmGenerateArgs) -> Result<()> {
    anyhow::bail!("todo")
}
