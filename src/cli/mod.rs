//! The command-line interface: `escale serve` runs the server; every other command talks to
//! its API (`ESCALE_URL`, `ESCALE_TOKEN`, or the credentials stored by `escale login`).
//!
//! Output is a human table by default and the API's JSON with `--json`. Exit codes: 0 success,
//! 1 the operation failed, 2 usage error, 3 server unreachable, 4 not authenticated/allowed.

mod backup;
mod client;
pub use client::next_link;
mod commands;
mod output;

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

pub use client::{load_credentials, CliError, Client, Credentials};

const EXAMPLES: &str = "\
Examples:
  escale serve                                   # run escale here (data in ./data, local Docker)
  escale setup --setup-token escsetup_... --name admin   # first admin (token printed by serve)
  escale apps create shop
  escale config set shop DATABASE_URL=postgres://db/shop --secret
  escale deploy shop --image registry.example.eu/shop:1.4 --port 8080
  escale scale shop web=7
  escale ps shop
  escale logs shop -f
  escale domains add shop shop.example.eu
  escale rollback shop v3
  escale apply -f escale.toml                    # process types, scale, domains, env from a file

Exit codes: 0 ok, 1 operation failed, 2 usage error, 3 server unreachable, 4 not authenticated or not allowed.
Environment: ESCALE_URL (default http://127.0.0.1:7300), ESCALE_TOKEN.";

/// escale: your own Heroku on your own Docker hosts.
#[derive(Debug, Parser)]
#[command(name = "escale", version, about, after_help = EXAMPLES, propagate_version = true)]
pub struct Cli {
    /// API URL of the escale server (default: the stored login's, else http://127.0.0.1:7300).
    #[arg(
        long,
        global = true,
        env = "ESCALE_URL",
        help_heading = "Global options"
    )]
    pub url: Option<String>,
    /// API token (default: the one stored by `escale login`).
    #[arg(
        long,
        global = true,
        env = "ESCALE_TOKEN",
        hide_env_values = true,
        help_heading = "Global options"
    )]
    pub token: Option<String>,
    /// Print JSON instead of tables (for scripts); errors as JSON on stderr.
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the escale server: registry, API, scheduler and proxy.
    #[command(
        after_help = "Examples:\n  escale serve\n  escale serve --config /etc/escale/escale.toml\n  ESCALE_DATA_DIR=/var/lib/escale ESCALE_HTTP_ADDR=off escale serve"
    )]
    Serve {
        /// Config file (default: ./config/escale.toml, then /etc/escale/escale.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// For systemd's ExecReload (`systemctl reload escale`): start a new `escale serve`
        /// (this binary, same config) that takes the sockets over from the running one, and
        /// return once the old one ($MAINPID) has drained and exited.
        #[arg(long)]
        reload: bool,
    },
    /// Bind the first admin with the one-time token printed by `escale serve`.
    #[command(
        after_help = "Example:\n  escale setup --url http://127.0.0.1:7300 --setup-token escsetup_... --name admin"
    )]
    Setup {
        /// The one-time setup token.
        #[arg(long = "setup-token", alias = "setup")]
        setup_token: String,
        /// Name of the first admin.
        #[arg(long)]
        name: String,
        /// Read the password from standard input instead of prompting.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Log in with a user name and password and store a token (0600) for later commands.
    Login {
        /// Your user name.
        #[arg(long)]
        name: String,
        /// Read the password from standard input (for scripts).
        #[arg(long)]
        password_stdin: bool,
    },
    /// Forget the stored token.
    Logout,
    /// Show who the token belongs to.
    Whoami,
    /// Create, list, inspect and destroy apps.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale apps create shop --port 8080\n  escale apps list\n  escale apps info shop\n  escale apps destroy shop --confirm shop"
    )]
    Apps(AppsCommand),
    /// Config vars (environment) of an app.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale config shop            # lists them, as `config get shop`\n  escale config get shop\n  escale config set shop LOG_LEVEL=debug WORKERS=4\n  escale config set shop DATABASE_URL=postgres://db/shop --secret\n  escale config get shop DATABASE_URL --reveal\n  escale config unset shop LOG_LEVEL"
    )]
    Config(ConfigCommand),
    /// Define or change a process type (command, port, health check).
    #[command(
        subcommand,
        after_help = "Examples:\n  escale processes list shop\n  escale processes set shop worker --health none -- /app/worker --queue default"
    )]
    Processes(ProcessesCommand),
    /// Set instance counts: `escale scale shop web=7 worker=2`.
    #[command(
        after_help = "Examples:\n  escale scale shop web=7\n  escale scale shop web=2 worker=1\n  escale scale shop web=0"
    )]
    Scale {
        /// The app, e.g. shop.
        app: String,
        /// PROCESS=COUNT pairs.
        #[arg(required = true, value_name = "PROCESS=COUNT")]
        counts: Vec<String>,
    },
    /// Set memory and CPU limits of a process type.
    #[command(
        after_help = "Examples:\n  escale resources shop web --memory 256m --cpus 0.5\n  escale resources shop web --memory none"
    )]
    Resources {
        /// The app, e.g. shop.
        app: String,
        /// The process type, e.g. web.
        process: String,
        /// e.g. 256m, 1g; `none` removes the limit.
        #[arg(long)]
        memory: Option<String>,
        /// e.g. 0.5, 2; `none` removes the limit.
        #[arg(long)]
        cpus: Option<String>,
    },
    /// Deploy an image as a new release.
    #[command(
        after_help = "Examples:\n  escale deploy shop --image registry.example.eu/shop:1.4\n  escale deploy shop --image shop:2 --port 8080 --no-wait"
    )]
    Deploy {
        /// The app, e.g. shop.
        app: String,
        /// Image reference.
        #[arg(long)]
        image: String,
        /// Port the web process listens on.
        #[arg(long)]
        port: Option<u16>,
        /// Return once the release is created, without following the rollout (also
        /// `--detach`, as for rollback and drain).
        #[arg(long, visible_alias = "detach")]
        no_wait: bool,
        /// Give up following after this long (the rollout itself has the server's deploy timeout).
        #[arg(long, default_value = "15m")]
        wait_timeout: humantime::Duration,
    },
    /// List an app's instances: release, node, state, health, address, uptime, restarts
    /// (replacements of the slot so far: crashes, failed starts, unhealthy instances), and
    /// the container's name on its node; says when the latest release failed, and why.
    #[command(
        after_help = "CONTAINER is the name the node's Docker engine knows the instance by (escale-<installation>-<instance>):\n`docker inspect`, `docker logs` and `docker exec` on that node accept it.\n\nExamples:\n  escale ps shop\n  docker inspect $(escale ps shop --json | jq -r '.instances[0].container')\n  escale ps shop --json | jq '.instances[].health'"
    )]
    Ps {
        /// The app, e.g. shop.
        app: String,
    },
    /// Show (and follow) the merged output of an app's instances.
    #[command(
        after_help = "Examples:\n  escale logs shop\n  escale logs shop -f --process web --tail 20"
    )]
    Logs {
        /// The app, e.g. shop.
        app: String,
        /// Keep streaming.
        #[arg(short, long)]
        follow: bool,
        /// Only this process type.
        #[arg(long)]
        process: Option<String>,
        /// Lines per instance from the end.
        #[arg(long, default_value_t = 100)]
        tail: usize,
    },
    /// List releases of an app.
    Releases {
        /// The app, e.g. shop.
        app: String,
    },
    /// Make a new release with the image and config of an earlier one, and follow its rollout
    /// as `deploy` does (exit 1 when it fails).
    #[command(
        after_help = "Examples:\n  escale rollback shop v3\n  escale rollback shop v3 --detach   # return once the release exists"
    )]
    Rollback {
        /// The app, e.g. shop.
        app: String,
        /// The release to go back to, e.g. v3.
        // Not the id `version`: that is the `--version` flag's, and clap panics at parse time
        // on the clash.
        #[arg(id = "release", value_name = "VERSION")]
        version: String,
        /// Return once the release is created, without following the rollout.
        #[arg(long, alias = "no-wait")]
        detach: bool,
        /// Give up following after this long (the rollout itself has the server's deploy timeout).
        #[arg(long, default_value = "15m")]
        wait_timeout: humantime::Duration,
    },
    /// Custom domains of an app.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale domains add shop shop.example.eu\n  escale domains list shop\n  escale domains remove shop shop.example.eu"
    )]
    Domains(DomainsCommand),
    /// TLS certificates of an app's host names (uploaded; ACME ones are listed too).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Push webhooks: deploy when GitHub, GitLab or Gitea/Forgejo report a push.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale webhooks set shop --repo https://github.com/acme/shop.git --branch main\n  escale webhooks show shop\n  escale webhooks remove shop\n\nThe secret is printed once by `set`; give it to the provider with the URL https://ESCALE/hooks/APP."
    )]
    Webhooks(WebhooksCommand),
    /// Make an app match an `escale.toml` manifest: process types, formation, resources,
    /// health checks, domains and non-secret config vars, in one step.
    #[command(
        after_help = "Examples:\n  escale export shop > escale.toml\n  escale apply -f escale.toml\n  escale apply -f staging.toml --app shop-staging\n\nAn invalid manifest changes nothing and exits 1 with FILE:LINE:COLUMN FIELD: MESSAGE."
    )]
    Apply {
        /// The manifest (`-` reads standard input).
        #[arg(short = 'f', long = "file", default_value = "escale.toml")]
        file: PathBuf,
        /// The app (default: the manifest's `app` key; if both are given they must agree).
        #[arg(long)]
        app: Option<String>,
        /// Also remove the process types the manifest does not declare (without it they are
        /// listed and left in place).
        #[arg(long)]
        prune: bool,
    },
    /// Print an app's current state as an `escale.toml` manifest (secret config vars left out).
    #[command(after_help = "Example:\n  escale export shop > escale.toml")]
    Export {
        /// The app, e.g. shop.
        app: String,
    },
    /// API tokens.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale tokens create --name ci\n  escale tokens list\n  escale tokens revoke ci\n  ESCALE_DATA_DIR=/var/lib/escale escale tokens create --name recovery   # on the server host"
    )]
    Tokens(TokensCommand),
    /// Users (admin).
    #[command(subcommand)]
    Users(UsersCommand),
    /// Teams (admin).
    #[command(subcommand)]
    Teams(TeamsCommand),
    /// Docker nodes: register one (its TLS bundle is written for you to install on it), list
    /// them with their state (ready, suspect, down, joining), capacity and certificates,
    /// cordon, drain, renew a certificate, remove. Admin.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale nodes add n2 --address 10.0.0.2:2376 --label disk=ssd\n  escale nodes list\n  escale nodes drain n2\n  escale nodes remove n2"
    )]
    Nodes(NodesCommand),
    /// Check this host: the Docker engine (reachable, version, storage driver, clock), the
    /// ports, the apps domain's DNS, free disk on the data dir and the engine, the registry,
    /// certificate expiries, the nodes. Says what to fix; exits 1 when something is wrong.
    #[command(
        after_help = "Examples:\n  escale doctor\n  escale doctor --config /etc/escale/escale.toml\n  escale doctor --json"
    )]
    Doctor {
        /// Config file (default: ./config/escale.toml, then /etc/escale/escale.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Install escale under systemd on this host (Debian, Ubuntu): the binary in
    /// /usr/local/bin, the config in /etc/escale, data in /var/lib/escale, the unit
    /// escale.service enabled and started (logs: `journalctl -u escale`). Run as root.
    #[command(
        after_help = "Examples:\n  sudo escale install\n  escale install --root /tmp/escale-root   # a throwaway root: files only, nothing started"
    )]
    Install {
        /// Install under this directory instead of / (nothing outside it is touched).
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// The binary to install (default: this one).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Enable the unit for boot but do not start it now.
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and remove the escale.service unit. The config, the data and the running apps stay
    /// unless --purge.
    #[command(
        after_help = "Examples:\n  sudo escale uninstall\n  sudo escale uninstall --purge   # also the config, the data dir, the apps' containers"
    )]
    Uninstall {
        /// Uninstall from this directory instead of /.
        #[arg(long, value_name = "DIR", default_value = "/")]
        root: PathBuf,
        /// Also remove /etc/escale, /var/lib/escale (registry, repositories, backups, master
        /// key) and the installation's containers and networks.
        #[arg(long)]
        purge: bool,
    },
    /// Backups: take one now, list them, restore one, export the master key.
    #[command(
        subcommand,
        after_help = "Examples:\n  escale backup create --to /mnt/offsite\n  escale backup list\n  escale backup export-key --out /root/escale-master.key\n  escale backup restore FILE --key-file /root/escale-master.key --data-dir /var/lib/escale"
    )]
    Backup(BackupCommand),
    /// Audit log: who changed what, when; with -f, then what happens live (instances
    /// started, healthy, replaced, crashed; rollouts; nodes).
    #[command(
        after_help = "Examples:\n  escale events shop\n  escale events -f\n  escale events shop -f --json | jq -c 'select(.type == \"instance_crashed\")'"
    )]
    Events {
        /// Only this app.
        app: Option<String>,
        /// Most events to show (newest first; pages are followed).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Keep streaming live events.
        #[arg(short, long)]
        follow: bool,
    },
    /// Print a shell completion script.
    #[command(after_help = "Example:\n  escale completions bash > /etc/bash_completion.d/escale")]
    Completions {
        /// The shell to write completions for.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum AppsCommand {
    /// Create an app (with a `web` process type).
    Create {
        /// The app's name: 1 to 30 lowercase letters, digits and `-`.
        name: String,
        /// The owning team (default: yours; another team needs the admin role).
        #[arg(long)]
        team: Option<String>,
        /// Port of the web process.
        #[arg(long)]
        port: Option<u16>,
    },
    /// List apps.
    List,
    /// Show an app.
    Info {
        /// The app's name.
        name: String,
    },
    /// Destroy an app, its releases, config and instances.
    Destroy {
        /// The app's name: 1 to 30 lowercase letters, digits and `-`.
        name: String,
        /// Repeat the app name to confirm.
        #[arg(long)]
        confirm: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Show config vars (secrets hidden unless --reveal, admins only).
    #[command(
        after_help = "Examples:\n  escale config get shop\n  escale config get shop DATABASE_URL --reveal\n  escale config get shop --json"
    )]
    Get {
        /// The app, e.g. shop.
        app: String,
        /// Only this config var.
        key: Option<String>,
        /// Show secret values (admins only).
        #[arg(long)]
        reveal: bool,
    },
    /// Set config vars: KEY=VALUE ...; creates a new release when the app is deployed.
    #[command(
        after_help = "Examples:\n  escale config set shop LOG_LEVEL=debug WORKERS=4\n  escale config set shop DATABASE_URL=postgres://db/shop --secret"
    )]
    Set {
        /// The app, e.g. shop.
        app: String,
        /// KEY=VALUE pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// Store encrypted and hide from reads.
        #[arg(long)]
        secret: bool,
    },
    /// Remove config vars.
    #[command(after_help = "Example:\n  escale config unset shop LOG_LEVEL WORKERS")]
    Unset {
        /// The app, e.g. shop.
        app: String,
        /// Names of the config vars.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// `escale config APP`: lists the app's config vars (as `config get APP`).
    #[command(external_subcommand)]
    App(Vec<String>),
}

#[derive(Debug, Subcommand)]
pub enum ProcessesCommand {
    /// List process types.
    List {
        /// The app, e.g. shop.
        app: String,
    },
    /// Create or change a process type.
    #[command(
        after_help = "Examples:\n  escale processes set shop worker --health none -- /app/worker --queue default\n  escale processes set shop web --port 8080 --health-path /healthz\n  escale processes set shop web --constraint disk=ssd --constraint zone=a\n  escale processes set shop web --constraint -      # any node again"
    )]
    Set(ProcessSet),
    /// Remove a process type; its instances stop.
    #[command(after_help = "Example:\n  escale processes remove shop worker")]
    Remove {
        /// The app, e.g. shop.
        app: String,
        /// The process type, e.g. worker.
        process: String,
    },
}

#[derive(Debug, Args)]
pub struct ProcessSet {
    /// The app, e.g. shop.
    pub app: String,
    /// The process type, e.g. web.
    pub process: String,
    /// Port the process listens on (given to it as $PORT).
    #[arg(long)]
    pub port: Option<u16>,
    /// http, tcp or none.
    #[arg(long)]
    pub health: Option<String>,
    /// Path of the HTTP health check, e.g. /healthz.
    #[arg(long)]
    pub health_path: Option<String>,
    /// Time between health checks of a healthy instance, e.g. 5s.
    #[arg(long)]
    pub health_interval: Option<humantime::Duration>,
    /// Time a health check may take, e.g. 2s.
    #[arg(long)]
    pub health_timeout: Option<humantime::Duration>,
    /// Time after start during which failed checks do not make an instance unhealthy, e.g. 30s.
    #[arg(long)]
    pub health_grace: Option<humantime::Duration>,
    /// Extra instances during a rolling deploy.
    #[arg(long)]
    pub surge: Option<u32>,
    /// Run only on nodes with this label, KEY=VALUE (repeat for several; they replace the
    /// current ones). `-` clears them: any node.
    #[arg(long = "constraint", value_name = "KEY=VALUE")]
    pub constraints: Vec<String>,
    /// Let instances use node memory and CPUs already given to others (true or false).
    #[arg(long)]
    pub overcommit: Option<bool>,
    /// Run the image's default command.
    #[arg(long, conflicts_with = "command")]
    pub default_command: bool,
    /// The command, as argv, after `--`.
    #[arg(last = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum DomainsCommand {
    Add {
        /// The app, e.g. shop.
        app: String,
        /// The domain, e.g. shop.example.eu (an international name is converted to its xn-- form).
        domain: String,
    },
    Remove {
        /// The app, e.g. shop.
        app: String,
        /// The domain, e.g. shop.example.eu (an international name is converted to its xn-- form).
        domain: String,
    },
    List {
        /// The app, e.g. shop.
        app: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhooksCommand {
    /// Set (or replace) the app's webhook; prints the secret once.
    Set {
        /// The app, e.g. shop.
        app: String,
        /// The repository fetched on a push (https:// or http://).
        #[arg(long = "repo")]
        repo: String,
        /// The branch whose pushes deploy.
        #[arg(long, default_value = "main")]
        branch: String,
        /// Use this secret instead of a generated one (read from standard input).
        #[arg(long)]
        secret_stdin: bool,
    },
    /// Show the app's webhook (never its secret).
    Show {
        /// The app, e.g. shop.
        app: String,
    },
    /// Remove the app's webhook.
    Remove {
        /// The app, e.g. shop.
        app: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Upload a certificate (PEM chain, leaf first) and its private key for DOMAIN, a custom
    /// domain of APP or APP.<apps domain>. Served at once; plain HTTP then redirects to HTTPS.
    #[command(
        after_help = "Example:\n  escale certs add shop shop.example.eu --cert fullchain.pem --key privkey.pem"
    )]
    Add {
        /// The app, e.g. shop.
        app: String,
        /// The domain, e.g. shop.example.eu (an international name is converted to its xn-- form).
        domain: String,
        /// PEM certificate chain file.
        #[arg(long)]
        cert: std::path::PathBuf,
        /// PEM private key file.
        #[arg(long)]
        key: std::path::PathBuf,
    },
    /// Certificate state of each host name of APP.
    List {
        /// The app, e.g. shop.
        app: String,
    },
    /// Remove the certificate of DOMAIN.
    Remove {
        /// The app, e.g. shop.
        app: String,
        /// The domain, e.g. shop.example.eu (an international name is converted to its xn-- form).
        domain: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Create a token. Without API credentials, on the server host, it creates an admin token
    /// directly in the data dir (for scripting and recovery).
    Create {
        /// The token's name.
        #[arg(long)]
        name: String,
        /// Create it in the local data dir even when API credentials exist.
        #[arg(long)]
        local: bool,
        /// Config file of the local server (for --local).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    List,
    Revoke {
        /// The token's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    Create {
        /// The user's name.
        name: String,
        /// admin or member.
        #[arg(long, default_value = "member")]
        role: String,
        /// The user's team (default: `default`).
        #[arg(long)]
        team: Option<String>,
        /// Read a password from standard input (else the user has none and uses tokens).
        #[arg(long)]
        password_stdin: bool,
    },
    List,
    Remove {
        /// The user's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take an online backup now (while escale serves and deploys): the registry,
    /// certificates and ACME account, the CA and node certificates, the git repositories,
    /// sealed with a key derived from the master key. Kept in the server's backup dir and,
    /// with [backup.s3], uploaded to the bucket (the command fails if the upload does);
    /// `--to DIR` also downloads it here.
    #[command(after_help = "Examples:
  escale backup create
  escale backup create --to /mnt/offsite")]
    Create {
        /// Also download the backup into this directory (on the machine running the CLI).
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
    },
    /// The backups in the server's backup dir and its bucket ([backup.s3]), newest first,
    /// with where each is: local, s3 or both.
    #[command(after_help = "Examples:
  escale backup list
  escale backup list --json")]
    List,
    /// Fetch a backup from the bucket of [backup.s3] into a directory, without a server: on
    /// a new host, with the config (or ESCALE_BACKUP_S3_* variables) of the one that died,
    /// before `escale backup restore`. `latest` is the newest backup in the bucket (of
    /// `--installation` when given).
    #[command(after_help = "Examples:
  escale backup download --list --config /etc/escale/escale.toml
  escale backup download latest --to /var/tmp --config /etc/escale/escale.toml
  escale backup download escale-a1b2-20261201T031003123Z.backup --to .
  escale backup restore /var/tmp/escale-a1b2-20261201T031003123Z.backup --key-file master.key")]
    Download {
        /// The backup's name, or `latest`.
        #[arg(required_unless_present = "list")]
        name: Option<String>,
        /// Directory to write it to (created if missing).
        #[arg(long, value_name = "DIR", default_value = ".")]
        to: PathBuf,
        /// Config file whose [backup.s3] to use (default: the default paths, then the
        /// environment).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// With `latest`: the newest backup of this installation id only.
        #[arg(long, value_name = "ID")]
        installation: Option<String>,
        /// List the backups in the bucket instead of downloading one.
        #[arg(long, conflicts_with = "name")]
        list: bool,
    },
    /// Restore a backup into a data dir, offline (no `escale serve` on it): refuses a
    /// non-empty data dir unless --force. Then start `escale serve` on it. A backup in the
    /// bucket is fetched first with `escale backup download`.
    #[command(after_help = "Examples:
  escale backup restore escale-a1b2-20261201T031003123Z.backup --key-file master.key --data-dir /var/lib/escale
  ESCALE_MASTER_KEY=$(cat key) escale backup restore FILE --config /etc/escale/escale.toml")]
    Restore {
        /// The backup file.
        file: PathBuf,
        /// Where to restore (default: the config's data_dir).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Config file whose data_dir to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// File holding the master key (from `escale backup export-key`); default:
        /// ESCALE_MASTER_KEY.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Replace the registry, repositories and master key of a non-empty data dir.
        #[arg(long)]
        force: bool,
    },
    /// Print the master key (or write it to a new 0600 file): a backup cannot be restored
    /// without it. Keep it apart from the backups. Runs on the server's host.
    #[command(after_help = "Examples:
  escale backup export-key --out /root/escale-master.key
  escale backup export-key --config /etc/escale/escale.toml")]
    ExportKey {
        /// Config file whose data_dir to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The data dir holding master.key (default: the config's data_dir).
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Write the key to this new file (0600) instead of standard output.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodesCommand {
    /// Each node: state, address, engine version, CPUs and memory (what it has and what
    /// escale placed there), instances, labels, certificate expiry, last heartbeat.
    List,
    /// One node, in full.
    Info {
        /// The node's name, e.g. n2.
        node: String,
    },
    /// Register a Docker host as a node: issues its server certificate from escale's own CA
    /// and writes its bundle (certificates, daemon.json, a systemd drop-in, install.sh) into
    /// a directory, to be installed on the node with `sudo sh install.sh`. The node joins
    /// the cluster as soon as its engine answers over mutual TLS.
    #[command(
        after_help = "Examples:\n  escale nodes add n2 --address 10.0.0.2:2376\n  escale nodes add n3 --address n3.example.eu:2376 --advertise 10.0.0.3 --label disk=ssd --out /tmp/n3\n  scp -r escale-node-n2 root@10.0.0.2: && ssh root@10.0.0.2 sh escale-node-n2/install.sh"
    )]
    Add {
        /// The node's name (lowercase letters, digits and `-`).
        node: String,
        /// HOST:PORT of its Docker engine with TLS (usually port 2376).
        #[arg(long)]
        address: String,
        /// The IP its published ports are reached on (default: the address's IP).
        #[arg(long)]
        advertise: Option<String>,
        /// A KEY=VALUE label, matched by process constraints; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// Where to write the bundle (default: ./escale-node-NODE).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Issue a node a new server certificate (before the old one expires, or for a new
    /// address) and write its new bundle; install it on the node as before.
    #[command(
        after_help = "Example:\n  escale nodes renew n2\n  escale nodes renew n2 --address 10.0.0.12:2376"
    )]
    Renew {
        /// The node's name, e.g. n2.
        node: String,
        /// A new HOST:PORT for the node.
        #[arg(long)]
        address: Option<String>,
        /// Where to write the bundle (default: ./escale-node-NODE).
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Place nothing new on a node; what runs there stays.
    #[command(after_help = "Example:\n  escale nodes cordon n2")]
    Cordon {
        /// The node's name, e.g. n2.
        node: String,
    },
    /// Let a cordoned or drained node take new instances again.
    #[command(after_help = "Example:\n  escale nodes uncordon n2")]
    Uncordon {
        /// The node's name, e.g. n2.
        node: String,
    },
    /// Cordon a node and move its instances to the other nodes, each replacement healthy
    /// before the instance it replaces stops; waits until none is left (or --detach).
    #[command(after_help = "Examples:\n  escale nodes drain n2\n  escale nodes drain n2 --detach")]
    Drain {
        /// The node's name, e.g. n2.
        node: String,
        /// Return at once instead of waiting for the instances to move.
        #[arg(long)]
        detach: bool,
        /// Give up waiting after this many seconds (the drain goes on).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Remove a node from the cluster (refused while escale's instances run there: drain
    /// it first). Its containers and Docker settings are left as they are.
    #[command(after_help = "Example:\n  escale nodes drain n2 && escale nodes remove n2")]
    Remove {
        /// The node's name, e.g. n2.
        node: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum TeamsCommand {
    Create {
        /// The team's name.
        name: String,
    },
    List,
}

/// The client options (global) that mean nothing to a command run on this machine without a
/// server: hidden from that command's help and refused on its command line (an environment
/// variable such as `ESCALE_URL` is not an error: it is for the other commands).
const NOT_FOR: &[(&str, &[&str])] = &[
    ("serve", &["url", "token", "json"]),
    ("completions", &["url", "token", "json"]),
    ("install", &["url", "token"]),
    ("uninstall", &["url", "token"]),
    ("doctor", &["url", "token"]),
];

/// The command line as parsed and shown: [`Cli`], with the client options that do not apply
/// to a local command ([`NOT_FOR`]) hidden from it.
pub fn command() -> clap::Command {
    let cmd = Cli::command();
    let globals: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    cmd.mut_subcommands(|sub| {
        let Some((_, ids)) = NOT_FOR.iter().find(|(n, _)| *n == sub.get_name()) else {
            return sub;
        };
        // The subcommand's own hidden copy: clap then leaves the global one out of it.
        globals
            .iter()
            .filter(|a| ids.contains(&a.get_id().as_str()))
            .fold(sub, |sub, a| sub.arg(a.clone().global(false).hide(true)))
    })
}

/// Parses the command line ([`command`]); a client option given to a local command is a
/// usage error saying so.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let mut cmd = command();
    let matches = cmd.try_get_matches_from_mut(args)?;
    if let Some((sub, _)) = matches.subcommand() {
        if let Some((_, ids)) = NOT_FOR.iter().find(|(n, _)| *n == sub) {
            for id in *ids {
                if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                    let sub_cmd = cmd.find_subcommand_mut(sub).expect("a parsed subcommand");
                    return Err(sub_cmd.error(
                        clap::error::ErrorKind::ArgumentConflict,
                        format!(
                            "--{id} does not apply to `escale {sub}`: it is an option of the commands that talk to a server"
                        ),
                    ));
                }
            }
        }
    }
    Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// Parses arguments, runs the command and exits with its code.
pub fn main() -> ! {
    let cli = parse_from(std::env::args_os()).unwrap_or_else(|e| e.exit());
    // A global flag after `escale config APP` is that external subcommand's argument.
    let json = cli.json
        || matches!(&cli.command, Command::Config(ConfigCommand::App(a)) if a.iter().any(|x| x == "--json"));
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut command(), "escale", &mut std::io::stdout());
        std::process::exit(0);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts");
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            let _ = std::io::stdout().flush();
            if json {
                // Scripts read one JSON object, with the same exit code.
                eprintln!("{}", e.to_json());
            } else {
                eprintln!("error: {e}");
            }
            e.exit_code()
        }
    };
    drop(runtime);
    std::process::exit(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// clap checks its definitions only when a command is parsed (and only in debug builds):
    /// check every subcommand here so a clash fails a unit test, not a user's command.
    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Every option and argument of every command says what it is, and the global options are
    /// grouped apart from each command's own.
    #[test]
    fn every_option_and_argument_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                let id = a.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if a.get_help().is_none() && a.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
                if a.is_global_set() {
                    assert_eq!(a.get_help_heading(), Some("Global options"), "{path} {id}");
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&command(), "escale", &mut missing);
        assert!(missing.is_empty(), "without a description: {missing:#?}");
    }

    /// `escale serve --help` shows serve's own options only; the client options are refused
    /// there when given, not when set in the environment.
    #[test]
    fn local_commands_leave_the_client_options_out() {
        let mut cmd = command();
        cmd.build();
        let serve = cmd.find_subcommand_mut("serve").expect("serve");
        let help = serve.render_long_help().to_string();
        for hidden in ["--url", "--token", "--json", "Global options"] {
            assert!(!help.contains(hidden), "{hidden} in:\n{help}");
        }
        assert!(
            help.contains("--config") && help.contains("--reload"),
            "{help}"
        );
        let doctor = cmd.find_subcommand_mut("doctor").expect("doctor");
        let help = doctor.render_long_help().to_string();
        assert!(help.contains("--json") && !help.contains("--url"), "{help}");
        let ps = cmd.find_subcommand_mut("ps").expect("ps");
        let help = ps.render_long_help().to_string();
        assert!(help.contains("--url") && help.contains("--json"), "{help}");

        for args in [
            &["escale", "serve", "--url", "http://x"][..],
            &["escale", "--url", "http://x", "serve"],
            &["escale", "serve", "--json"],
            &["escale", "install", "--token", "t"],
        ] {
            let e = parse_from(args).expect_err("refused");
            assert_eq!(e.exit_code(), 2, "{args:?}");
            assert!(e.to_string().contains("does not apply to `escale "), "{e}");
        }
        assert!(matches!(
            parse_from(["escale", "serve", "--reload"]).map(|c| c.command),
            Ok(Command::Serve { reload: true, .. })
        ));
        let cli = parse_from(["escale", "ps", "shop", "--url", "http://x", "--json"]).expect("ps");
        assert_eq!(cli.url.as_deref(), Some("http://x"));
        assert!(cli.json);
    }

    #[test]
    fn rollback_parses_its_version() {
        let cli = Cli::try_parse_from(["escale", "rollback", "shop", "v3"]).expect("parses");
        match cli.command {
            Command::Rollback { app, version, .. } => {
                assert_eq!((app.as_str(), version.as_str()), ("shop", "v3"))
            }
            other => panic!("{other:?}"),
        }
    }
}
