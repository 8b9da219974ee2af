use anyhow::Result;
pub fn run(_a: crate::lm_cli::LmDemoArgs) -> Result<()> {
    anyhow::bail!("todo")
}
