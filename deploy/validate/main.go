// Command validate checks fanout's Kubernetes manifests offline.
//
//	go run ./deploy/validate -k deploy/k8s              the kustomization and every resource it lists
//	kubectl kustomize deploy/k8s | go run ./deploy/validate -     a rendered stream
//	go run ./deploy/validate -k deploy/k8s -emit docker        docker run flags for the Deployment's container
//	go run ./deploy/validate -k deploy/k8s -emit probes        "readiness PATH", "liveness PATH", "grace SECONDS"
//
// Every object is decoded strictly into the Kubernetes API types (k8s.io/api): an unknown or
// misspelt field, a duplicate key or a wrong type is an error. Then the objects are checked
// against each other and against what fanout needs: selectors that match the pod labels, probes
// on /readyz and /healthz, a restricted security context with a read-only root filesystem,
// resources, a termination grace period above the drain plus the preStop pause, an HPA and a PDB
// aimed at the Deployment. Exit status 0 when all is well, 1 with one line per problem otherwise.
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

func check(objs *objects) {
	if len(objs.deployments) != 1 {
		fail("want exactly one Deployment, got %d", len(objs.deployments))
		return
	}
	d := objs.deployments[0]
	if d.Spec.Replicas == nil || *d.Spec.Replicas != 3 {
		fail("Deployment %s: want replicas: 3", d.Name)
	}
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	podLabels := labels.Set(d.Spec.Template.Labels)
	if err != nil || d.Spec.Selector == nil || sel.Empty() || !sel.Matches(podLabels) {
		fail("Deployment %s: selector does not match the pod template's labels", d.Name)
	}
	pod := d.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		fail("Deployment %s: want one container, got %d", d.Name, len(pod.Containers))
		return
	}
	c := &pod.Containers[0]
	if httpPath(c.ReadinessProbe) != "/readyz" {
		fail("container %s: readinessProbe must GET /readyz", c.Name)
	}
	if httpPath(c.LivenessProbe) != "/healthz" {
		fail("container %s: livenessProbe must GET /healthz", c.Name)
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
		fail("pod: runAsNonRoot must be true")
	}
	if psc == nil || psc.RunAsUser == nil || *psc.RunAsUser == 0 {
		fail("pod: runAsUser must be a non-zero uid (the image's 10001)")
	}
	if psc == nil || psc.SeccompProfile == nil || (psc.SeccompProfile.Type != corev1.SeccompProfileTypeRuntimeDefault && psc.SeccompProfile.Type != corev1.SeccompProfileTypeLocalhost) {
		fail("pod: seccompProfile must be RuntimeDefault or Localhost")
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
	// A drain must never be cut short by SIGKILL.
	settings := env(c, objs)
	drainMs := int64(10000) // fanout's default
	if v, ok := settings["FANOUT_DRAIN_MS"]; ok {
		if drainMs, err = strconv.ParseInt(v, 10, 64); err != nil {
			fail("FANOUT_DRAIN_MS: %q is not a number", v)
		}
	}
	grace := int64(30)
	if pod.TerminationGracePeriodSeconds != nil {
		grace = *pod.TerminationGracePeriodSeconds
	}
	pause := preStopSleep(c)
	if pause == 0 {
		fail("container %s: no preStop pause (sleep N)", c.Name)
	}
	if grace*1000 <= drainMs+pause*1000 {
		fail("terminationGracePeriodSeconds %d must exceed FANOUT_DRAIN_MS %d ms + preStop %d s", grace, drainMs, pause)
	}
	if u, ok := settings["FANOUT_UPSTREAM"]; !ok || !strings.Contains(u, "{id}") {
		fail("no FANOUT_UPSTREAM with {id} in the container's settings")
	}
	ports := map[string]int32{}
	for _, p := range c.Ports {
		ports[p.Name] = p.ContainerPort
	}

	for _, s := range objs.services {
		if len(s.Spec.Selector) == 0 || !labels.SelectorFromSet(s.Spec.Selector).Matches(podLabels) {
			fail("Service %s: selector does not match the pods", s.Name)
		}
		for _, p := range s.Spec.Ports {
			if p.TargetPort.StrVal != "" {
				if _, ok := ports[p.TargetPort.StrVal]; !ok {
					fail("Service %s: targetPort %q is no container port", s.Name, p.TargetPort.StrVal)
				}
			}
		}
	}
	if len(objs.services) != 1 {
		fail("want one Service, got %d", len(objs.services))
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
func emitDocker(objs *objects) {
	d := objs.deployments[0]
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

func emitProbes(objs *objects) {
	d := objs.deployments[0]
	c := &d.Spec.Template.Spec.Containers[0]
	fmt.Printf("readiness %s\nliveness %s\n", httpPath(c.ReadinessProbe), httpPath(c.LivenessProbe))
	grace := int64(30)
	if d.Spec.Template.Spec.TerminationGracePeriodSeconds != nil {
		grace = *d.Spec.Template.Spec.TerminationGracePeriodSeconds
	}
	fmt.Printf("grace %d\nprestop %d\n", grace, preStopSleep(c))
}

func main() {
	dir := flag.String("k", "", "a kustomization directory: read kustomization.yaml and its resources")
	emit := flag.String("emit", "", "after checking, print \"docker\" run flags or \"probes\"")
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
	switch *emit {
	case "docker":
		emitDocker(objs)
	case "probes":
		emitProbes(objs)
	case "":
		n := len(objs.deployments) + len(objs.services) + len(objs.configMaps) + len(objs.hpas) + len(objs.pdbs)
		fmt.Printf("validate: %d objects decoded strictly and consistent\n", n)
	default:
		fmt.Fprintln(os.Stderr, "validate: -emit wants docker or probes")
		os.Exit(2)
	}
}
