using System.Diagnostics;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Api.Tests.Demo;

/// <summary>docker-compose.yml, as docker-compose reads it (this machine runs no containers: its config, not its run).</summary>
public sealed class DockerComposeTests
{
    [Fact]
    public async Task EveryService_IsRestartedWhenItsProcessEnds()
    {
        // A silo voted dead ends its own process, an API node that found no silo in 60 s exits, a silo that found no
        // PostgreSQL or Redis in 60 s too: without a restart policy the cluster shrank for good.
        var services = await ServicesAsync();

        Assert.Equal(["api1", "api2", "postgres", "redis", "silo1", "silo2"], services.Keys.Order());
        Assert.All(services, service => Assert.Contains("restart: unless-stopped", service.Value));
    }

    // Each service's lines of `docker-compose config`, which writes services in order, two spaces in, their settings further in.
    private static async Task<Dictionary<string, List<string>>> ServicesAsync()
    {
        var start = new ProcessStartInfo("docker-compose", ["-f", Path.Combine(Binaries.Root, "docker-compose.yml"), "config"])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var process = Process.Start(start) ?? throw new InvalidOperationException("docker-compose did not start.");
        var output = process.StandardOutput.ReadToEndAsync();
        var errors = process.StandardError.ReadToEndAsync();
        try
        {
            await process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(60));
        }
        catch (TimeoutException)
        {
            process.Kill(entireProcessTree: true);
            throw;
        }
        Assert.True(process.ExitCode == 0, await errors);

        var services = new Dictionary<string, List<string>>();
        List<string>? current = null;
        var inServices = false;
        foreach (var line in (await output).Split('\n'))
        {
            if (!line.StartsWith(' '))
            {
                inServices = line == "services:";
                current = null;
            }
            else if (inServices && line.Length > 2 && line[2] != ' ' && line.EndsWith(':'))
            {
                services[line.Trim().TrimEnd(':')] = current = [];
            }
            else if (current is not null)
            {
                current.Add(line.Trim());
            }
        }

        return services;
    }
}
