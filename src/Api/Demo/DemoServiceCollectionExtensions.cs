using System.Security.Claims;
using Npgsql;

namespace OrleansIdempotency.Api.Demo;

/// <summary>Registers the demo API's services.</summary>
public static class DemoServiceCollectionExtensions
{
    /// <summary>The authorization policy of the operator's surface: the users listed in <c>Demo:Operators</c>.</summary>
    public const string OperatorsPolicy = "idempotency-operators";

    /// <summary>
    /// API-key authentication (<c>Demo:ApiKeys</c>), the operators' policy (<c>Demo:Operators</c>), controllers, and
    /// the demo store: PostgreSQL when <c>ConnectionStrings:Postgres</c> is set, in memory otherwise.
    /// </summary>
    public static IHostApplicationBuilder AddDemo(this IHostApplicationBuilder builder)
    {
        var services = builder.Services;
        services.AddAuthentication(ApiKeyAuthenticationOptions.Scheme)
            .AddScheme<ApiKeyAuthenticationOptions, ApiKeyAuthenticationHandler>(ApiKeyAuthenticationOptions.Scheme,
                options => builder.Configuration.GetSection("Demo:ApiKeys").Bind(options.Keys));
        var operators = builder.Configuration.GetSection("Demo:Operators").Get<string[]>() ?? [];
        services.AddAuthorization(options => options.AddPolicy(OperatorsPolicy, policy => policy
            .RequireAuthenticatedUser()
            .RequireAssertion(context => context.User.FindFirst(ClaimTypes.NameIdentifier)?.Value is { } user && operators.Contains(user, StringComparer.Ordinal))));
        services.AddProblemDetails();
        services.AddExceptionHandler<DemoStoreUnavailableHandler>();
        services.AddControllers();
        services.AddSingleton(TimeProvider.System);

        // Blank as the cluster's settings read it: unset.
        if (builder.Configuration.GetConnectionString("Postgres") is { } postgres && !string.IsNullOrWhiteSpace(postgres))
        {
            services.AddSingleton(_ => NpgsqlDataSource.Create(postgres));
            services.AddSingleton<PostgresDemoStore>();
            services.AddSingleton<IDemoStore>(sp => sp.GetRequiredService<PostgresDemoStore>());
            services.AddHostedService(sp => sp.GetRequiredService<PostgresDemoStore>());
        }
        else
        {
            services.AddSingleton<IDemoStore, InMemoryDemoStore>();
        }

        return builder;
    }
}
