# Stand-ins for the parts of OpenWrt's /etc/rc.common, /lib/functions.sh (config_load and
# friends) and /lib/functions/procd.sh that an init script's start_service and
# service_triggers use, written from their documented behaviour. Sourced by service.sh
# inside a scratch root (busybox ash); the init script is sourced after it, as rc.common
# does, so the script's own config_cb/option_cb/list_cb replace the defaults below.
#
# Instead of talking to procd over ubus, it prints what procd would be told, one line per
# parameter, fields separated by tabs:
#   instance                      (procd_open_instance)
#   command<TAB>ARG<TAB>ARG...    (procd_set_param / procd_append_param, merged)
#   env<TAB>K=V...  user<TAB>NAME  respawn  stdout<TAB>1  ...
#   trigger<TAB>config.change<TAB>qpq   trigger<TAB>mount.add<TAB>PATH
#   status<TAB>N                  (start_service's exit status)
# Diagnostics (logger, echo >&2) go to stderr.

# --- /lib/functions.sh: UCI ---------------------------------------------------------
config_cb() { return 0; }
option_cb() { return 0; }
list_cb() { return 0; }

package() { return 0; }

config() {
	CONFIG_NUM_SECTIONS=$((CONFIG_NUM_SECTIONS + 1))
	CONFIG_SECTION="${2:-cfg$CONFIG_NUM_SECTIONS}"
	CONFIG_SECTIONS="$CONFIG_SECTIONS $CONFIG_SECTION"
	eval "CONFIG_${CONFIG_SECTION}_TYPE=\$1"
	config_cb "$1" "$CONFIG_SECTION"
}

option() {
	local name="$1"
	shift
	eval "CONFIG_${CONFIG_SECTION}_${name}=\$*"
	option_cb "$name" "$*"
}

list() {
	local name="$1" len
	shift
	eval "len=\${CONFIG_${CONFIG_SECTION}_${name}_LENGTH:-0}"
	len=$((len + 1))
	eval "CONFIG_${CONFIG_SECTION}_${name}_ITEM$len=\$*"
	eval "CONFIG_${CONFIG_SECTION}_${name}_LENGTH=$len"
	eval "CONFIG_${CONFIG_SECTION}_${name}=\"\${CONFIG_${CONFIG_SECTION}_${name}:+\$CONFIG_${CONFIG_SECTION}_${name} }\$*\""
	list_cb "$name" "$*"
}

# The UCI file format (config/option/list lines, quoted values, # comments) is read here by
# the shell itself, which is what `uci export` output amounts to.
config_load() {
	CONFIG_SECTIONS=""
	CONFIG_NUM_SECTIONS=0
	CONFIG_SECTION=""
	[ -f "/etc/config/$1" ] || return 1
	. "/etc/config/$1"
	# uci_load ends by calling config_cb without arguments once a section was read.
	[ -n "$CONFIG_SECTION" ] && config_cb
	return 0
}

# config_get VAR SECTION OPTION [DEFAULT] | config_get SECTION OPTION
config_get() {
	case "$3" in
	"") eval echo "\"\${CONFIG_${1}_${2}:-\${4}}\"" ;;
	*) eval "$1=\${CONFIG_${2}_${3}:-\${4}}" ;;
	esac
}

config_get_bool() {
	local _tmp
	config_get _tmp "$2" "$3" "$4"
	case "$_tmp" in
	1 | on | true | yes | enabled) _tmp=1 ;;
	0 | off | false | no | disabled) _tmp=0 ;;
	*) _tmp="$4" ;;
	esac
	eval "$1=\$_tmp"
}

# --- /etc/rc.common -----------------------------------------------------------------
extra_command() { return 0; }

logger() { echo "logger: $*" >&2; }

# --- procd.sh -------------------------------------------------------------------------
RC_SHIM_TYPES=""

procd_open_instance() {
	RC_SHIM_TYPES=""
	echo instance
}

procd_set_param() {
	local type="$1" arg value=""
	shift
	for arg in "$@"; do value="$value	$arg"; done
	case " $RC_SHIM_TYPES " in *" $type "*) ;; *) RC_SHIM_TYPES="$RC_SHIM_TYPES $type" ;; esac
	eval "RC_SHIM_P_$type=\$value"
}

procd_append_param() {
	local type="$1" arg value
	shift
	eval "value=\${RC_SHIM_P_$type}"
	for arg in "$@"; do value="$value	$arg"; done
	case " $RC_SHIM_TYPES " in *" $type "*) ;; *) RC_SHIM_TYPES="$RC_SHIM_TYPES $type" ;; esac
	eval "RC_SHIM_P_$type=\$value"
}

procd_close_instance() {
	local type value
	for type in $RC_SHIM_TYPES; do
		eval "value=\${RC_SHIM_P_$type}"
		printf '%s%s\n' "$type" "$value"
	done
}

procd_add_reload_trigger() {
	local file
	for file in "$@"; do printf 'trigger\tconfig.change\t%s\n' "$file"; done
}

procd_add_restart_mount_trigger() {
	local path
	for path in "$@"; do printf 'trigger\tmount.add\t%s\n' "$path"; done
}

# What `/etc/init.d/NAME start` (and `reload`) does: start_service, then the triggers.
rc_shim_start() {
	local status
	start_service
	status=$?
	service_triggers
	printf 'status\t%s\n' "$status"
}
