// Command validate checks fanout's Kubernetes manifests offline.
//
//	go run ./deploy/validate -k deploy/k8s              the kustomization and every resource it lists
//	kubectl kustomize deploy/k8s | go run ./deploy/validate -     a rendered stream
//	go run ./deploy/validate -k deploy/k8s -emit docker        docker run flags for fanout's container
//	go run ./deploy/validate -k deploy/k8s -emit probes        "readiness PATH", "liveness PATH", "grace SECONDS", "prestop SECONDS"
//	go run ./deploy/validate -k deploy/k8s -emit upstreams     "SERVICE DEPLOYMENT REPLICAS PORT" per upstream Service
//	go run ./deploy/validate -k deploy/k8s -emit args -deployment items    another Deployment's container args
//
// Every object is decoded strictly into the Kubernetes API types (k8s.io/api): an unknown or
// misspelt field, a duplicate key or a wrong type is an error. Then the objects are checked
// against each other and against what fanout needs. fanout's Deployment is the one whose
// container has FANOUT_UPSTREAM; every Deployment (fanout's and the upstreams') needs selectors
// that match its pod labels, HTTP probes, a restricted security context with a read-only root
// filesystem, resources, and a preStop pause within its grace period. fanout's probes are on
// /readyz and /healthz and its grace period is above the drain plus the preStop pause; an HPA and
// a PDB aim at it. A FANOUT_UPSTREAM host that names a Service here must name a headless one
// (clusterIP: None) over one Deployment's pods, with the template's port a port of their
// container. Exit status 0 when all is well, 1 with one line per problem otherwise.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

// kustomization holds the fields of kustomization.yaml this project uses; any other field is
// reported, so a typo cannot silently drop a setting.
type kustomization struct {
	APIVersion string   `json:"apiVersion"`
	Kind       string   `json:"kind"`
	Resources  []string `json:"resources"`
	Labels     []struct {
		Pairs            map[string]string `json:"pairs"`
		IncludeSelectors bool              `json:"includeSelectors"`
		IncludeTemplates bool              `json:"includeTemplates"`
	} `json:"labels"`
	Images []struct {
		Name    string `json:"name"`
		NewName string `json:"newName"`
		NewTag  string `json:"newTag"`
		Digest  string `json:"digest"`
	} `json:"images"`
}

type objects struct {
	deployments []*appsv1.Deployment
	services    []*corev1.Service
	configMaps  []*corev1.ConfigMap
	hpas        []*autoscalingv2.HorizontalPodAutoscaler
	pdbs        []*policyv1.PodDisruptionBudget
}

var problems []string

func fail(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

// documents splits a YAML stream on its "---" lines and drops empty documents.
func documents(data []byte) [][]byte {
	var docs [][]byte
	for _, d := range regexp.MustCompile(`(?m)^---[ \t]*$`).Split(string(data), -1) {
		trimmed := strings.TrimSpace(regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAllString(d, ""))
		if trimmed != "" {
			docs = append(docs, []byte(d))
		}
	}
	return docs
}

// decode strictly decodes one document into the API type its apiVersion and kind name.
func decode(where string, doc []byte, objs *objects) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		fail("%s: %v", where, err)
		return
	}
	var target any
	switch tm.APIVersion + " " + tm.Kind {
	case "apps/v1 Deployment":
		o := &appsv1.Deployment{}
		objs.deployments, target = append(objs.deployments, o), o
	case "v1 Service":
		o := &corev1.Service{}
		objs.services, target = append(objs.services, o), o
	case "v1 ConfigMap":
		o := &corev1.ConfigMap{}
		objs.configMaps, target = append(objs.configMaps, o), o
	case "autoscaling/v2 HorizontalPodAutoscaler":
		o := &autoscalingv2.HorizontalPodAutoscaler{}
		objs.hpas, target = append(objs.hpas, o), o
	case "policy/v1 PodDisruptionBudget":
		o := &policyv1.PodDisruptionBudget{}
		objs.pdbs, target = append(objs.pdbs, o), o
	default:
		fail("%s: unexpected object %q %q", where, tm.APIVersion, tm.Kind)
		return
	}
	if err := yaml.UnmarshalStrict(doc, target); err != nil {
		fail("%s: %s %s: %v", where, tm.APIVersion, tm.Kind, err)
	}
}

func readStream(where string, data []byte, objs *objects) {
	for i, doc := range documents(data) {
		decode(fmt.Sprintf("%s#%d", where, i+1), doc, objs)
	}
}

func readKustomization(dir string, objs *objects) {
	path := filepath.Join(dir, "kustomization.yaml")
	data, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
		return
	}
	var k kustomization
	if err := yaml.UnmarshalStrict(data, &k); err != nil {
		fail("%s: %v", path, err)
		return
	}
	if k.APIVersion != "kustomize.config.k8s.io/v1beta1" || k.Kind != "Kustomization" {
		fail("%s: want kustomize.config.k8s.io/v1beta1 Kustomization, got %q %q", path, k.APIVersion, k.Kind)
	}
	if len(k.Resources) == 0 {
		fail("%s: no resources", path)
	}
	for _, r := range k.Resources {
		p := filepath.Join(dir, r)
		data, err := os.ReadFile(p)
		if err != nil {
			fail("%s: resource %s: %v", path, r, err)
			continue
		}
		readStream(p, data, objs)
	}
}

// preStopSleep returns N for a preStop hook `sleep N`, else 0.
func preStopSleep(c *corev1.Container) int64 {
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
		return 0
	}
	if s := c.Lifecycle.PreStop.Sleep; s != nil {
		return s.Seconds
	}
	if e := c.Lifecycle.PreStop.Exec; e != nil && len(e.Command) == 2 && e.Command[0] == "sleep" {
		n, _ := strconv.ParseInt(e.Command[1], 10, 64)
		return n
	}
	return 0
}

func httpPath(p *corev1.Probe) string {
	if p == nil || p.HTTPGet == nil {
		return ""
	}
	return p.HTTPGet.Path
}

// env returns the container's settings: its ConfigMap's data (envFrom), then its env values.
func env(c *corev1.Container, objs *objects) map[string]string {
	out := map[string]string{}
	for _, from := range c.EnvFrom {
		if from.ConfigMapRef == nil {
			continue
		}
		found := false
		for _, cm := range objs.configMaps {
			if cm.Name == from.ConfigMapRef.Name {
				found = true
				for k, v := range cm.Data {
					out[from.Prefix+k] = v
				}
			}
		}
		if !found {
			fail("container %s: envFrom names ConfigMap %q, which is not among the objects", c.Name, from.ConfigMapRef.Name)
		}
	}
	for _, e := range c.Env {
		if e.ValueFrom == nil {
			out[e.Name] = e.Value
		}
	}
	return out
}

// podChecks checks what every Deployment here needs: a selector that matches its pods, one
// container with HTTP readiness and liveness probes, requests and limits, the "restricted" Pod
// Security Standard with a read-only root filesystem, and a preStop pause below the grace
// period. It returns the container (nil when there is not exactly one).
func podChecks(d *appsv1.Deployment) *corev1.Container {
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || d.Spec.Selector == nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		fail("Deployment %s: selector does not match the pod template's labels", d.Name)
	}
	pod := d.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		fail("Deployment %s: want one container, got %d", d.Name, len(pod.Containers))
		return nil
	}
	c := &pod.Containers[0]
	if httpPath(c.ReadinessProbe) == "" {
		fail("container %s: no HTTP readinessProbe", c.Name)
	}
	if httpPath(c.LivenessProbe) == "" {
		fail("container %s: no HTTP livenessProbe", c.Name)
	}
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		if _, ok := c.Resources.Requests[r]; !ok {
			fail("container %s: no %s request", c.Name, r)
		}
		if _, ok := c.Resources.Limits[r]; !ok {
			fail("container %s: no %s limit", c.Name, r)
		}
	}
	// The "restricted" Pod Security Standard, plus a read-only root filesystem.
	psc, sc := pod.SecurityContext, c.SecurityContext
	nonRoot := (psc != nil && psc.RunAsNonRoot != nil && *psc.RunAsNonRoot) || (sc != nil && sc.RunAsNonRoot != nil && *sc.RunAsNonRoot)
	if !nonRoot {
		fail("Deployment %s: runAsNonRoot must be true", d.Name)
	}
	if psc == nil || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		fail("Deployment %s: runAsUser must be a non-zero uid (the image's 10001)", d.Name)
	}
	if psc == nil || psc.SeccompProfile == nil || (psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault && psc.SeccompProfile.Type != corev1.SeccompProfileTypeLocalhost) {
		fail("Deployment %s: seccompProfile must be RuntimeDefault or Localhost", d.Name)
	}
	if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		fail("container %s: allowPrivilegeEscalation must be false", c.Name)
	}
	if sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		fail("container %s: readOnlyRootFilesystem must be true", c.Name)
	}
	if sc == nil || sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || len(sc.Capabilities.Add) != 0 {
		fail("container %s: capabilities must drop ALL and add none", c.Name)
	}
	if sc != nil && sc.Privileged != nil && *sc.Privileged {
		fail("container %s: privileged", c.Name)
	}
	if preStopSleep(c) == 0 {
		fail("container %s: no preStop pause (sleep N)", c.Name)
	}
	if preStopSleep(c) >= grace(d) {
		fail("Deployment %s: terminationGracePeriodSeconds %d must exceed the preStop pause %d s", d.Name, grace(d), preStopSleep(c))
	}
	return c
}

func grace(d *appsv1.Deployment) int64 {
	if g := d.Spec.Template.Spec.TerminationGracePeriodSeconds; g != nil {
		return *g
	}
	return 30
}

// fanoutDeployment is the Deployment whose container has FANOUT_UPSTREAM in its settings: fanout
// itself (the others are upstreams). Nil, with a problem, unless there is exactly one.
func fanoutDeployment(objs *objects) *appsv1.Deployment {
	var found []*appsv1.Deployment
	for _, d := range objs.deployments {
		if cs := d.Spec.Template.Spec.Containers; len(cs) == 1 {
			if _, ok := env(&cs[0], objs)["FANOUT_UPSTREAM"]; ok {
				found = append(found, d)
			}
		}
	}
	if len(found) != 1 {
		fail("want exactly one Deployment with FANOUT_UPSTREAM in its container's settings (fanout), got %d", len(found))
		return nil
	}
	return found[0]
}

// deploymentNamed returns the Deployment called name, or nil with a problem.
func deploymentNamed(objs *objects, name string) *appsv1.Deployment {
	for _, d := range objs.deployments {
		if d.Name == name {
			return d
		}
	}
	fail("no Deployment %q", name)
	return nil
}

// selected returns the Deployments whose pods the Service selects.
func selected(s *corev1.Service, objs *objects) []*appsv1.Deployment {
	var out []*appsv1.Deployment
	if len(s.Spec.Selector) == 0 {
		return nil
	}
	sel := labels.SelectorFromSet(s.Spec.Selector)
	for _, d := range objs.deployments {
		if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			out = append(out, d)
		}
	}
	return out
}

// upstreamTarget is one FANOUT_UPSTREAM template whose host is a Service of these manifests.
type upstreamTarget struct {
	service    *corev1.Service
	deployment *appsv1.Deployment
	port       int32 // the template's port
}

var templateHost = regexp.MustCompile(`^[a-z][a-z0-9+.-]*://([^/:?#]+)(?::([0-9]+))?/`)

// upstreamTargets checks each FANOUT_UPSTREAM template whose host names a Service here ("name",
// "name.namespace", "name.namespace.svc[.cluster.local]"): the Service must be headless, so that
// the name resolves to every ready pod (each one a member of fanout's), select one Deployment's
// pods, and the template's port must be a port of that Deployment's container (fanout connects
// to the pods directly: a headless Service maps no port).
func upstreamTargets(upstream string, objs *objects) []upstreamTarget {
	var out []upstreamTarget
	for _, tmpl := range strings.FieldsFunc(upstream, func(r rune) bool { return r == ',' || r == ' ' }) {
		m := templateHost.FindStringSubmatch(tmpl)
		if m == nil {
			fail("FANOUT_UPSTREAM: %q has no scheme://host/ to check", tmpl)
			continue
		}
		host := strings.TrimSuffix(m[1], ".")
		port := int32(80)
		if m[2] != "" {
			p, _ := strconv.ParseInt(m[2], 10, 32)
			port = int32(p)
		}
		name, rest, _ := strings.Cut(host, ".")
		if rest != "" && !strings.Contains(rest, ".") && rest != "svc" {
			rest += ".svc" // "name.namespace"
		}
		if rest != "" && !strings.Contains("."+rest, ".svc") {
			continue // a name outside the cluster
		}
		for _, s := range objs.services {
			if s.Name != name {
				continue
			}
			if s.Spec.ClusterIP != corev1.ClusterIPNone {
				fail("FANOUT_UPSTREAM: Service %s must be headless (clusterIP: None): through a ClusterIP Service fanout sees one virtual address, not the pods", s.Name)
			}
			ds := selected(s, objs)
			if len(ds) != 1 {
				fail("FANOUT_UPSTREAM: Service %s selects the pods of %d Deployments, want 1", s.Name, len(ds))
				continue
			}
			found := false
			for _, p := range ds[0].Spec.Template.Spec.Containers[0].Ports {
				found = found || p.ContainerPort == port
			}
			if !found {
				fail("FANOUT_UPSTREAM: port %d is no container port of Deployment %s (a headless Service maps no port: fanout connects to the pods directly)", port, ds[0].Name)
			}
			out = append(out, upstreamTarget{s, ds[0], port})
		}
	}
	return out
}

func check(objs *objects) {
	d := fanoutDeployment(objs)
	if d == nil {
		return
	}
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		fail("Deployment %s: want replicas: 3", d.Name)
	}
	for _, o := range objs.deployments {
		if o != d {
			podChecks(o)
		}
	}
	c := podChecks(d)
	if c == nil {
		return
	}
	podLabels := labels.Set(d.Spec.Template.Labels)
	if httpPath(c.ReadinessProbe) != "/readyz" {
		fail("container %s: readinessProbe must GET /readyz", c.Name)
	}
	if httpPath(c.LivenessProbe) != "/healthz" {
		fail("container %s: livenessProbe must GET /healthz", c.Name)
	}
	// A drain must never be cut short by SIGKILL.
	settings := env(c, objs)
	drainMs := int64(10000) // fanout's default
	if v, ok := settings["FANOUT_DRAIN_MS"]; ok {
		var err error
		if drainMs, err = strconv.ParseInt(v, 10, 64); err != nil {
			fail("FANOUT_DRAIN_MS: %q is not a number", v)
		}
	}
	if pause := preStopSleep(c); grace(d)*1000 <= drainMs+pause*1000 {
		fail("terminationGracePeriodSeconds %d must exceed FANOUT_DRAIN_MS %d ms + preStop %d s", grace(d), drainMs, pause)
	}
	if u, ok := settings["FANOUT_UPSTREAM"]; !ok || !strings.Contains(u, "{id}") {
		fail("no FANOUT_UPSTREAM with {id} in the container's settings")
	} else {
		upstreamTargets(u, objs)
	}
	if hp, ok := settings["FANOUT_HEALTH_PATH"]; ok && !strings.HasPrefix(hp, "/") {
		fail("FANOUT_HEALTH_PATH: %q must start with /", hp)
	}

	// Every Service selects the pods of exactly one Deployment, on ports its container has;
	// exactly one of them is fanout's.
	fanoutServices := 0
	for _, s := range objs.services {
		ds := selected(s, objs)
		if len(ds) != 1 {
			fail("Service %s: selector matches the pods of %d Deployments, want 1", s.Name, len(ds))
			continue
		}
		if ds[0] == d {
			fanoutServices++
		}
		ports := map[string]int32{}
		for _, p := range ds[0].Spec.Template.Spec.Containers[0].Ports {
			ports[p.Name] = p.ContainerPort
		}
		for _, p := range s.Spec.Ports {
			if p.TargetPort.StrVal != "" {
				if _, ok := ports[p.TargetPort.StrVal]; !ok {
					fail("Service %s: targetPort %q is no container port", s.Name, p.TargetPort.StrVal)
				}
			}
		}
	}
	if fanoutServices != 1 {
		fail("want one Service for fanout's pods, got %d", fanoutServices)
	}
	if len(objs.hpas) != 1 {
		fail("want one HorizontalPodAutoscaler, got %d", len(objs.hpas))
	}
	for _, h := range objs.hpas {
		ref := h.Spec.ScaleTargetRef
		if ref.APIVersion != "apps/v1" || ref.Kind != "Deployment" || ref.Name != d.Name {
			fail("HorizontalPodAutoscaler %s: scaleTargetRef must be apps/v1 Deployment %s", h.Name, d.Name)
		}
		if h.Spec.MinReplicas == nil || *h.Spec.MinReplicas < 2 || h.Spec.MaxReplicas < *h.Spec.MinReplicas {
			fail("HorizontalPodAutoscaler %s: want 2 <= minReplicas <= maxReplicas", h.Name)
		}
		if len(h.Spec.Metrics) == 0 {
			fail("HorizontalPodAutoscaler %s: no metrics", h.Name)
		}
	}
	if len(objs.pdbs) != 1 {
		fail("want one PodDisruptionBudget, got %d", len(objs.pdbs))
	}
	for _, p := range objs.pdbs {
		ps, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err != nil || p.Spec.Selector == nil || ps.Empty() || !ps.Matches(podLabels) {
			fail("PodDisruptionBudget %s: selector does not match the pods", p.Name)
		}
		if p.Spec.MinAvailable != nil && d.Spec.Replicas != nil && p.Spec.MinAvailable.IntVal >= *d.Spec.Replicas {
			fail("PodDisruptionBudget %s: minAvailable %d leaves no pod to evict of %d", p.Name, p.Spec.MinAvailable.IntVal, *d.Spec.Replicas)
		}
	}
}

// emitDocker prints `docker run` flags, one per line, that reproduce the Deployment's container
// under Docker: user, read-only root, capabilities, no-new-privileges, limits and settings.
func emitDocker(d *appsv1.Deployment, objs *objects) {
	pod := d.Spec.Template.Spec
	c := &pod.Containers[0]
	psc, sc := pod.SecurityContext, c.SecurityContext
	gid := *psc.RunAsUser
	if psc.RunAsGroup != nil {
		gid = *psc.RunAsGroup
	}
	fmt.Printf("--user=%d:%d\n", *psc.RunAsUser, gid)
	if sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		fmt.Println("--read-only")
	}
	for _, capability := range sc.Capabilities.Drop {
		fmt.Printf("--cap-drop=%s\n", capability)
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		fmt.Println("--security-opt=no-new-privileges")
	}
	if m, ok := c.Resources.Limits[corev1.ResourceMemory]; ok {
		fmt.Printf("--memory=%d\n", m.Value())
	}
	if cpu, ok := c.Resources.Limits[corev1.ResourceCPU]; ok {
		fmt.Printf("--cpus=%.3f\n", float64(cpu.MilliValue())/1000)
	}
	settings := env(c, objs)
	var buf bytes.Buffer
	for k, v := range settings {
		fmt.Fprintf(&buf, "--env=%s=%s\n", k, v)
	}
	fmt.Print(buf.String())
}

// emitArgs prints the container's command and args, one per line (what follows the image in
// `docker run`; the image's entrypoint is fanout).
func emitArgs(d *appsv1.Deployment) {
	c := &d.Spec.Template.Spec.Containers[0]
	for _, a := range append(append([]string{}, c.Command...), c.Args...) {
		fmt.Println(a)
	}
}

func emitProbes(d *appsv1.Deployment) {
	c := &d.Spec.Template.Spec.Containers[0]
	fmt.Printf("readiness %s\nliveness %s\n", httpPath(c.ReadinessProbe), httpPath(c.LivenessProbe))
	fmt.Printf("grace %d\nprestop %d\n", grace(d), preStopSleep(c))
}

// emitUpstreams prints, for each FANOUT_UPSTREAM template whose host is a headless Service here,
// "SERVICE DEPLOYMENT REPLICAS PORT".
func emitUpstreams(d *appsv1.Deployment, objs *objects) {
	for _, t := range upstreamTargets(env(&d.Spec.Template.Spec.Containers[0], objs)["FANOUT_UPSTREAM"], objs) {
		replicas := int32(1)
		if t.deployment.Spec.Replicas != nil {
			replicas = *t.deployment.Spec.Replicas
		}
		fmt.Printf("%s %s %d %d\n", t.service.Name, t.deployment.Name, replicas, t.port)
	}
}

func main() {
	dir := flag.String("k", "", "a kustomization directory: read kustomization.yaml and its resources")
	emit := flag.String("emit", "", "after checking, print \"docker\" run flags, the container's \"args\", \"probes\" or \"upstreams\"")
	name := flag.String("deployment", "", "the Deployment -emit describes [fanout's: the one with FANOUT_UPSTREAM]")
	flag.Parse()
	objs := &objects{}
	if *dir != "" {
		readKustomization(*dir, objs)
	}
	for _, arg := range flag.Args() {
		var data []byte
		var err error
		if arg == "-" {
			data, err = io.ReadAll(os.Stdin)
		} else {
			data, err = os.ReadFile(arg)
		}
		if err != nil {
			fail("%v", err)
			continue
		}
		readStream(arg, data, objs)
	}
	if *dir == "" && flag.NArg() == 0 {
		fail("nothing to check: give -k DIR or files (- for stdin)")
	}
	if len(problems) == 0 {
		check(objs)
	}
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "validate:", p)
		}
		os.Exit(1)
	}
	d := fanoutDeployment(objs)
	if *name != "" {
		d = deploymentNamed(objs, *name)
	}
	if d == nil {
		for _, p := range problems {
			fmt.Fprintln(os.Stderr, "validate:", p)
		}
		os.Exit(1)
	}
	switch *emit {
	case "docker":
		emitDocker(d, objs)
	case "args":
		emitArgs(d)
	case "probes":
		emitProbes(d)
	case "upstreams":
		emitUpstreams(d, objs)
	case "":
		n := len(objs.deployments) + len(objs.services) + len(objs.configMaps) + len(objs.hpas) + len(objs.pdbs)
		fmt.Printf("validate: %d objects decoded strictly and consistent\n", n)
	default:
		fmt.Fprintln(os.Stderr, "validate: -emit wants docker, args, probes or upstreams")
		os.Exit(2)
	}
}
